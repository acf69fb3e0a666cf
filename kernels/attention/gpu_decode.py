"""Decode attention as a Pallas Mosaic GPU (Hopper) kernel: one query per sequence, a KV cache.

Split-K ("flash-decoding", Dao et al. 2023, https://pytorch.org/blog/flash-decoding/) over the
model's cache layout ``[B, S, K, H]``: the grid is ``(B, K, P)``. Each program holds the
``G = N // K`` queries of one kv head as the rows of a ``[R, H]`` tile (``G`` zero-padded to
``R``, a multiple of the 64 rows of a warpgroup MMA) and streams ``[block_s, H]`` K/V tiles of
that head from HBM through a ``plgpu.emit_pipeline`` TMA pipeline of ``num_stages`` SMEM
buffers, so a tile is read once for every query head of its group (GQA/MQA as in Pope et al.
2022 §3.3). Each tile is one online-softmax step of the flash forward (``gpu.attend_tile``: two
wgmmas, float32 statistics); the padded rows cost tensor-core time that decode, bound by the
K/V bytes, has to spare. The visible key range of each sequence is split evenly over ``P``
partitions at run time (the pipeline's step count is dynamic: tiles past ``lengths[b]`` or
before the window are never fetched). With ``P == 1`` the kernel writes the normalised output;
otherwise each partition writes float32 (max, sum, unnormalised output) and a jnp combine
merges them.

Positions outside ``[max(0, len - w), len)`` are masked in the logits; in a tile that straddles
either end, the invisible V rows are zeroed in SMEM first, so garbage in the cache (NaN, inf)
never reaches the output. ``S`` is padded to a multiple of 8 only when it is not one (a copy;
the TMA tiling needs it); a partial last tile is read with TMA's out-of-bounds zero fill.

float16 / bfloat16 on GPU (wgmma); interpret mode (CPU) also runs float32, with the wgmmas
swapped for ``dot_general`` and the layout casts skipped (``gpu._matmul``). Measured on one
H100 by ``python -m kernels.gpucheck``. Example::

    out_BNH = decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import checks, gpu
from kernels.attention.tpu_decode import combine_partitions, visible_bounds  # shared with TPU

_TILE_BYTES = 32 * 1024  # one K (or V) tile; x2 (K, V) x num_stages must fit ~200 KiB of SMEM
_MAX_BLOCK_S = 256  # the largest TMA box dimension
_LN2 = 0.6931471805599453
_SMEM_BUDGET = 200 * 1024  # of the 227 KiB a block may use on H100
_TARGET_PROGRAMS = 132  # H100 SXM streaming multiprocessors


def _interpret_params():
    """Interpret-mode settings: a partial last tile reads NaN past ``S`` (the kernel masks it;
    real TMA fills zeros). The public home of ``InterpretGPUParams`` moved between releases."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret import params as module

        params = module.InterpretGPUParams
    return params(out_of_bounds_reads="uninitialized")


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiling of the GPU decode kernel.

    Attributes:
      block_s: cache positions per K/V tile; a multiple of 64 (the rows of the WGMMA register
        layout the tile is loaded in), at most 256 (one TMA box).
      num_partitions: ``P``, sequence partitions computed in parallel and then combined.
      num_stages: SMEM buffers of the K/V TMA pipeline (copies in flight).
    """

    block_s: int
    num_partitions: int = 1
    num_stages: int = 2

    def __post_init__(self):
        if self.block_s < 64 or self.block_s % 64 or self.block_s > _MAX_BLOCK_S:
            raise ValueError(
                f"block_s must be a positive multiple of 64 and <= {_MAX_BLOCK_S}, "
                f"got {self.block_s}"
            )
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    @classmethod
    def default(cls, *, B: int, S: int, K: int, H: int, dtype, G: int = 1) -> DecodeBlockSizes:
        """Tiles of about 32 KiB (64-256 rows, <= S rounded up), halved while the SMEM of ``G``
        query heads and two stages exceeds ~200 KiB; ~132 parallel programs."""
        itemsize = jnp.dtype(dtype).itemsize
        block_s = max(64, min(_MAX_BLOCK_S, _TILE_BYTES // (H * itemsize)))
        block_s = 1 << (block_s.bit_length() - 1)
        block_s = min(block_s, pl.cdiv(S, 64) * 64)
        R = pl.cdiv(G, 64) * 64
        while True:
            num_partitions = max(1, min(pl.cdiv(S, block_s), pl.cdiv(_TARGET_PROGRAMS, B * K)))
            smem = (R * H + 2 * 2 * block_s * H) * itemsize
            smem += (R * H + 2 * R) * 4 if num_partitions > 1 else 0
            if smem <= _SMEM_BUDGET:
                return cls(block_s=block_s, num_partitions=num_partitions, num_stages=2)
            if block_s == 64:  # H = 256 with partitions: one stage fits
                return cls(block_s=64, num_partitions=num_partitions, num_stages=1)
            block_s //= 2


def _partition_blocks(start, end, p, *, block_s, num_partitions):
    """First kv block of partition ``p`` and its block count (0 when it has none)."""
    lo = jax.lax.div(start, block_s)
    n = jnp.where(end > start, jax.lax.div(end + block_s - 1, block_s) - lo, 0)
    per = jax.lax.div(n + num_partitions - 1, num_partitions)
    count = jnp.clip(n - p * per, 0, per)
    return lo + p * per, count


def _decode_kernel(
    bounds_ref, q_ref, k_ref, v_ref, *out_refs, block_s, num_partitions, num_stages, scale,
    softcap, interpreting,
):  # fmt: skip
    # Register layouts guide the Mosaic GPU lowering; the interpreter has no layout_cast rule.
    _cast = (lambda x, layout: x) if interpreting else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    b, h, p = jax.lax.axis_index("b"), jax.lax.axis_index("k"), jax.lax.axis_index("p")
    start, end = bounds_ref[2 * b], bounds_ref[2 * b + 1]
    first, count = _partition_blocks(start, end, p, block_s=block_s, num_partitions=num_partitions)
    R, H = q_ref.shape[2], q_ref.shape[3]
    transforms = gpu.smem_transforms(H, q_ref.dtype)

    def scoped(q_smem, q_barrier, *out_smem):
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[0])
        col_RS = _cast(jax.lax.broadcasted_iota(jnp.int32, (R, block_s), 1), L)
        row_SH = _cast(jax.lax.broadcasted_iota(jnp.int32, (block_s, H), 0), L)

        def body(indices, k_smem, v_smem, carry):
            (i,) = indices
            lo = (first + i) * block_s

            # A tile that straddles start or end may hold anything (NaN, inf) in its invisible
            # rows: zero them in V, or 0 * NaN would reach the output through P V.
            @pl.when((lo < start) | (lo + block_s > end))
            def _zero_invisible_values():
                pos_SH = lo + row_SH
                v_SH = _cast(v_smem[...], L)
                keep = (pos_SH >= start) & (pos_SH < end)
                v_smem[...] = jnp.where(keep, v_SH, jnp.zeros_like(v_SH))
                plgpu.commit_smem()

            return gpu.attend_tile_masked_if(
                (lo < start) | (lo + block_s > end),
                lambda: (lo + col_RS >= start) & (lo + col_RS < end),
                q_smem, k_smem, v_smem, carry, scale=scale, softcap=softcap,
                interpreting=interpreting,
            )  # fmt: skip

        spec = plgpu.BlockSpec((block_s, H), lambda i: (first + i, 0), transforms=transforms)
        init = (
            _cast(jnp.zeros((R, H), jnp.float32), L),
            _cast(jnp.full((R,), gpu.MASK_VALUE, jnp.float32), L.reduce(1)),
            _cast(jnp.zeros((R,), jnp.float32), L.reduce(1)),
        )
        acc, m, l_sum = plgpu.emit_pipeline(
            body,
            grid=(count,),
            in_specs=[spec, spec],
            max_concurrent_steps=num_stages,
            init_carry=init,
        )(k_ref.at[b, :, h, :], v_ref.at[b, :, h, :])
        if num_partitions == 1:  # the final output, through q's buffer: no combine
            q_smem[...] = gpu.normalize(acc, l_sum).astype(q_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_refs[0].at[b, h])
        else:
            m_smem, l_smem, o_smem = out_smem
            m_smem[...] = m * _LN2  # attend_tile keeps the max in base 2
            l_smem[...] = l_sum
            o_smem[...] = acc
            plgpu.commit_smem()
            for ref, smem in zip(out_refs, out_smem, strict=True):
                plgpu.copy_smem_to_gmem(smem, ref.at[b, h, p])
        plgpu.wait_smem_to_gmem(0)

    f32 = jnp.float32
    outs = []
    if num_partitions > 1:
        outs = [plgpu.SMEM((R,), f32), plgpu.SMEM((R,), f32), plgpu.SMEM((R, H), f32)]
    pl.run_scoped(
        scoped,
        plgpu.SMEM((R, H), q_ref.dtype, transforms=transforms),
        plgpu.Barrier(num_barriers=1),
        *outs,
    )


@functools.partial(
    jax.jit, static_argnames=("sliding_window", "softcap", "scale", "block_sizes", "interpret")
)
def decode_attention(
    q_BNH,
    k_BSKH,
    v_BSKH,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret=False,
):
    """One new query per sequence against a ``[B, S, K, H]`` KV cache (Pallas Mosaic GPU).

    Args:
      q_BNH: the query of the token at position ``lengths[b] - 1``; ``N % K == 0``.
      k_BSKH, v_BSKH: the cache; its first ``lengths[b]`` positions are valid and include the
        new token's own key and value. Same float dtype; positions past ``lengths`` may hold
        anything.
      lengths_B: int ``[B]`` valid cache positions per sequence.
      sliding_window: ``w`` restricts the query at ``p`` to keys at positions ``> p - w``.
      softcap: ``c`` applies ``c * tanh(logits / c)`` before the softmax.
      scale: logit scale, default ``H ** -0.5``.
      block_sizes: a ``DecodeBlockSizes``; default ``DecodeBlockSizes.default(...)``.
      interpret: ``True`` (or an ``InterpretGPUParams``) runs the kernel in Mosaic GPU
        interpret mode (on CPU).

    Returns:
      ``[B, N, H]`` in the dtype of ``q``; zeros for a sequence with no visible key.
    """
    checks.check_decode(q_BNH, k_BSKH, v_BSKH, lengths_B)
    B, N, H = q_BNH.shape
    _, S, K, _ = k_BSKH.shape
    if not jnp.issubdtype(k_BSKH.dtype, jnp.floating):
        raise ValueError(f"k must be a float array, got {k_BSKH.dtype}")
    if not interpret and q_BNH.dtype not in gpu.WGMMA_DTYPES:
        raise ValueError(
            f"pallas_gpu decode attention needs float16 or bfloat16 inputs (wgmma), got "
            f"{q_BNH.dtype}; cast, or use impl='xla'"
        )
    if block_sizes is None:
        block_sizes = DecodeBlockSizes.default(B=B, S=S, K=K, H=H, dtype=k_BSKH.dtype, G=N // K)
    if scale is None:
        scale = H**-0.5
    if interpret is True:
        interpret = _interpret_params()
    elif interpret is False:
        interpret = None

    G, P = N // K, block_sizes.num_partitions
    R = pl.cdiv(G, 64) * 64  # the query heads of a group, padded to the rows of a wgmma
    q_BKRH = jnp.pad(q_BNH.reshape(B, K, G, H), ((0, 0), (0, 0), (0, R - G), (0, 0)))
    k_BSKH, v_BSKH = gpu.pad_keys(k_BSKH, v_BSKH)
    kernel = functools.partial(
        _decode_kernel,
        block_s=block_sizes.block_s,
        num_partitions=P,
        num_stages=block_sizes.num_stages,
        scale=scale,
        softcap=softcap,
        interpreting=interpret is not None,
    )
    f32 = jnp.float32
    if P == 1:
        out_type = jax.ShapeDtypeStruct((B, K, R, H), q_BNH.dtype)
    else:
        out_type = (
            jax.ShapeDtypeStruct((B, K, P, R), f32),
            jax.ShapeDtypeStruct((B, K, P, R), f32),
            jax.ShapeDtypeStruct((B, K, P, R, H), f32),
        )
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(B, K, P),
        grid_names=("b", "k", "p"),
        interpret=interpret,
    )(visible_bounds(lengths_B, S, sliding_window), q_BKRH, k_BSKH, v_BSKH)
    if P > 1:
        out = combine_partitions(*out)
    return out[:, :, :G].reshape(B, N, H).astype(q_BNH.dtype)
