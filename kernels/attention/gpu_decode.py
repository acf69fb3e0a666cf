"""Decode attention as a Pallas Mosaic GPU (Hopper) kernel: one query per sequence, a KV cache.

Split-K ("flash-decoding", Dao et al. 2023, https://pytorch.org/blog/flash-decoding/) over the
model's cache layout ``[B, S, K, H]``: the grid is ``(B, K, P)``. Each program holds the
``G = N // K`` queries of one kv head and streams ``[block_s, H]`` K/V tiles of that head from
HBM through a ``plgpu.emit_pipeline`` TMA pipeline of ``num_stages`` SMEM buffers, so a tile is
read once for every query head of its group (GQA/MQA as in Pope et al. 2022 §3.3). The visible
key range of each sequence is split evenly over ``P`` partitions at run time (the pipeline's
step count is dynamic: tiles past ``lengths[b]`` or before the window are never fetched); each
partition keeps float32 online-softmax statistics (max, sum, unnormalised output) in registers
and a jnp combine in the wrapper merges them.

The ``G x block_s`` logits and ``G x H`` output are tiny matmuls (G is 1-8 in practice, far
below the 64 rows of a wgmma), so the kernel computes them in float32 registers, one query head
at a time (a static loop over ``G``): the tile is loaded in the WGMMA register layout, the
logits are a broadcast-multiply and a row reduction, ``p @ V`` a broadcast-multiply and a
column reduction. Decode is bound by the K/V bytes streamed, not by these FLOPs. ``S`` need not be a
multiple of ``block_s``: the partial last tile is read with TMA's out-of-bounds zero fill, and
positions outside ``[max(0, len - w), len)`` are masked in the logits and zeroed in V, so
garbage in the cache never reaches the output.

Validated on CPU with Mosaic GPU interpret mode and by cross-lowering to Mosaic GPU for CUDA
(``tests/kernels/test_decode_gpu.py``); not yet compiled or run on GPU hardware. The interpreter
has no rule for ``plgpu.layout_cast``, so the layout casts are skipped when interpreting. Example::

    out_BNH = decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention.tpu_decode import combine_partitions, visible_bounds  # shared with TPU

_TILE_BYTES = 32 * 1024  # one K (or V) tile; x2 (K, V) x num_stages must fit ~200 KiB of SMEM
_MAX_BLOCK_S = 256  # the largest TMA box dimension
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
    def default(cls, *, B: int, S: int, K: int, H: int, dtype) -> DecodeBlockSizes:
        """Tiles of about 32 KiB (64-256 rows, <= S rounded up); ~132 parallel programs."""
        block_s = max(64, min(_MAX_BLOCK_S, _TILE_BYTES // (H * jnp.dtype(dtype).itemsize)))
        block_s = 1 << (block_s.bit_length() - 1)
        block_s = min(block_s, pl.cdiv(S, 64) * 64)
        num_blocks = pl.cdiv(S, block_s)
        num_partitions = max(1, min(num_blocks, pl.cdiv(_TARGET_PROGRAMS, B * K)))
        return cls(block_s=block_s, num_partitions=num_partitions, num_stages=2)


def _partition_blocks(start, end, p, *, block_s, num_partitions):
    """First kv block of partition ``p`` and its block count (0 when it has none)."""
    lo = jax.lax.div(start, block_s)
    n = jnp.where(end > start, jax.lax.div(end + block_s - 1, block_s) - lo, 0)
    per = jax.lax.div(n + num_partitions - 1, num_partitions)
    count = jnp.clip(n - p * per, 0, per)
    return lo + p * per, count


def _decode_kernel(
    bounds_ref, q_ref, k_ref, v_ref, stats_ref, o_ref, *, block_s, num_partitions,
    num_stages, scale, softcap, interpreting,
):  # fmt: skip
    # Register layouts guide the Mosaic GPU lowering; the interpreter has no layout_cast rule.
    _cast = (lambda x, layout: x) if interpreting else plgpu.layout_cast
    b, h, p = jax.lax.axis_index("b"), jax.lax.axis_index("k"), jax.lax.axis_index("p")
    start, end = bounds_ref[2 * b], bounds_ref[2 * b + 1]
    first, count = _partition_blocks(start, end, p, block_s=block_s, num_partitions=num_partitions)
    G, H = q_ref.shape[2], q_ref.shape[3]

    def scoped(q_smem, stats_smem, o_smem, q_barrier):
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[0])
        L = plgpu.Layout.WGMMA
        ROW, COL = L.reduce(1), L.reduce(0)

        def body(indices, k_smem, v_smem, carry):
            (i,) = indices
            iota_S = _cast(jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0), ROW)
            pos_S = (first + i) * block_s + iota_S
            visible_S = (pos_S >= start) & (pos_S < end)
            k_SH = _cast(k_smem[...], L).astype(jnp.float32)
            v_SH = _cast(v_smem[...], L).astype(jnp.float32)
            # Zero invisible V rows: 0 * NaN in the cache would otherwise poison the output.
            v_SH = jnp.where(jax.lax.broadcast_in_dim(visible_S, (block_s, H), (0,)), v_SH, 0.0)
            new = []
            for g, (m, sum_, o_H) in enumerate(carry):
                q_H = _cast(q_smem[g], COL).astype(jnp.float32) * scale
                s_S = jnp.sum(k_SH * jax.lax.broadcast_in_dim(q_H, (block_s, H), (1,)), axis=1)
                if softcap is not None:
                    s_S = softcap * jnp.tanh(s_S / softcap)
                s_S = jnp.where(visible_S, s_S, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s_S))
                alpha = jnp.exp(m - m_new)  # every fetched tile has a visible key
                p_S = jnp.exp(s_S - m_new)
                l_new = alpha * sum_ + jnp.sum(p_S)
                pv_H = jnp.sum(jax.lax.broadcast_in_dim(p_S, (block_s, H), (0,)) * v_SH, axis=0)
                new.append((m_new, l_new, alpha * o_H + pv_H))
            return tuple(new)

        swizzle = min(128, H * jnp.dtype(k_ref.dtype).itemsize)
        transforms = (
            plgpu.TilingTransform((8, swizzle // jnp.dtype(k_ref.dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle),
        )
        spec = plgpu.BlockSpec((block_s, H), lambda i: (first + i, 0), transforms=transforms)
        zero_H = _cast(jnp.zeros((H,), jnp.float32), COL)
        init = tuple((jnp.float32(-jnp.inf), jnp.float32(0), zero_H) for _ in range(G))
        final = plgpu.emit_pipeline(
            body,
            grid=(count,),
            in_specs=[spec, spec],
            max_concurrent_steps=num_stages,
            init_carry=init,
        )(k_ref.at[b, :, h, :], v_ref.at[b, :, h, :])
        for g, (m, sum_, o_H) in enumerate(final):
            stats_smem[g, 0] = m
            stats_smem[g, 1] = sum_
            o_smem[g] = o_H
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stats_smem, stats_ref.at[b, h, p])
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, p])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((G, H), q_ref.dtype),
        plgpu.SMEM((G, 4), jnp.float32),
        plgpu.SMEM((G, H), jnp.float32),
        plgpu.Barrier(num_barriers=1),
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
    B, N, H = q_BNH.shape
    if k_BSKH.ndim != 4 or k_BSKH.shape != v_BSKH.shape or k_BSKH.dtype != v_BSKH.dtype:
        raise ValueError(
            f"k and v must be [B, S, K, H] of equal shape and dtype, got {k_BSKH.shape} "
            f"{k_BSKH.dtype} and {v_BSKH.shape} {v_BSKH.dtype}"
        )
    _, S, K, _ = k_BSKH.shape
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H or N % K:
        raise ValueError(f"q {q_BNH.shape} does not match cache {k_BSKH.shape} (N % K == 0)")
    if lengths_B.shape != (B,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
        raise ValueError(f"lengths_B must be an integer array of shape ({B},)")
    for name, x in (("q", q_BNH), ("k", k_BSKH)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got {x.dtype}")
    if block_sizes is None:
        block_sizes = DecodeBlockSizes.default(B=B, S=S, K=K, H=H, dtype=k_BSKH.dtype)
    if scale is None:
        scale = H**-0.5
    if interpret is True:
        interpret = _interpret_params()
    elif interpret is False:
        interpret = None

    G, P = N // K, block_sizes.num_partitions
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
    # Row g of stats holds (max, sum, -, -): 16-byte rows, as TMA needs for GMEM strides.
    stats_BKPG4, o_BKPGH = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((B, K, P, G, 4), f32),
            jax.ShapeDtypeStruct((B, K, P, G, H), f32),
        ),
        grid=(B, K, P),
        grid_names=("b", "k", "p"),
        interpret=interpret,
    )(
        visible_bounds(lengths_B, S, sliding_window),
        q_BNH.reshape(B, K, G, H),
        k_BSKH,
        v_BSKH,
    )
    o_BKGH = combine_partitions(stats_BKPG4[..., 0], stats_BKPG4[..., 1], o_BKPGH)
    return o_BKGH.reshape(B, N, H).astype(q_BNH.dtype)
