"""Flash attention forward as a Pallas Mosaic GPU (Hopper) kernel; inference / prefill only.

Online-softmax attention (Dao et al. 2022, arXiv:2205.14135, Algorithm 1) with float32
statistics, shaped for H100: the grid is ``(B, N, ceil(T / block_q))``; a program holds one
``[block_q, H]`` query tile of one query head in SMEM and streams the ``[block_kv, H]`` K/V tiles
of its kv head ``n // G`` (GQA/MQA without repeating K/V) from HBM through a
``plgpu.emit_pipeline`` TMA pipeline of ``num_stages`` SMEM buffers. Both matmuls are warpgroup
MMAs (``plgpu.wgmma``): ``Q K^T`` from SMEM into a float32 accumulator, ``P V`` with ``P`` cast to
the input dtype in registers; one warpgroup, ``block_q = 64`` rows by default. Masked tiles are
never fetched: per (sequence, query block) the wrapper computes the contiguous range of kv
tiles holding a visible key (causal diagonal, sliding window, ``lengths``;
``tpu.kv_block_ranges``) and the pipeline's step count is that run-time count.

``T`` is padded up to ``block_q`` in the wrapper (a copy of ``q`` only); ``S`` is not padded:
the partial last K/V tile relies on TMA's out-of-bounds zero fill (interpret mode is told to
fill zeros too) and its keys are masked in the logits. Semantics are those of
``reference.masked_attention``. There is no backward: ``jax.grad`` raises a ``ValueError``.

float16 / bfloat16 only on GPU: a float32 (tf32) wgmma takes neither ``P`` from registers nor
``V`` MN-major. Mosaic GPU interpret mode (CPU) runs everything except the wgmmas: its wgmma
rule takes neither transposed SMEM refs nor register operands, so ``_matmul`` swaps in a float32
``dot_general`` when interpreting (float32 inputs then work too), and the layout casts, which
it has no rule for, are skipped. Validated on CPU in interpret mode and by cross-lowering for
CUDA (``tests/kernels/test_attention_gpu.py``)::

    out_BTNH = flash_attention(q, k, v, causal=True, sliding_window=256, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention.tpu import kv_block_ranges

# Finite stand-in for -inf: keeps exp(m_prev - m_new) free of inf - inf before any key is seen.
MASK_VALUE = -1e30
_MAX_TMA_BOX = 256
# float32 would be a tf32 wgmma, which takes neither a register A operand (P) nor an
# MN-major B operand (V); only interpret mode, whose matmuls are dot_generals, runs float32.
_WGMMA_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _interpret_params():
    """Interpret-mode settings: out-of-bounds TMA reads return zeros, as on the hardware. The
    public home of ``InterpretGPUParams`` moved between releases."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret import params as module

        params = module.InterpretGPUParams
    return params(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU flash-attention forward.

    Attributes:
      block_q: query rows per program; a multiple of 64 (the rows of one warpgroup MMA).
      block_kv: keys per K/V tile; a multiple of 64, at most 256 (one TMA box).
      num_stages: SMEM buffers of the K/V TMA pipeline (copies in flight).
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % 64 or b > _MAX_TMA_BOX:
                raise ValueError(
                    f"{name} must be a positive multiple of 64 and <= {_MAX_TMA_BOX}, got {b!r}"
                )
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    @classmethod
    def for_shape(cls, T: int, S: int, H: int, dtype) -> BlockSizes:
        """``block_q = 64``; K/V tiles of at most 32 KiB each, capped by ``S`` rounded up."""
        block_kv = 128 if H * jnp.dtype(dtype).itemsize <= 256 else 64
        return cls(block_q=64, block_kv=min(block_kv, -(-S // 64) * 64), num_stages=2)


@dataclasses.dataclass(frozen=True)
class _Config:
    T: int
    S: int
    causal: bool
    sliding_window: int | None
    softcap: float | None
    scale: float
    block_sizes: BlockSizes
    interpret: bool


def _smem_transforms(H: int, dtype):
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, H * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _matmul(a, b_smem, *, transpose_b: bool, interpreting: bool):
    """``a @ b`` (``a @ b^T`` with ``transpose_b``) in float32; ``a`` an SMEM ref or registers.

    On GPU a warpgroup MMA (``plgpu.wgmma``) into a fresh accumulator. The interpreter's wgmma
    rule takes neither transposed SMEM refs nor register operands, so interpret mode uses a
    register ``dot_general`` with the same float32 accumulation.
    """
    M, N = a.shape[0], b_smem.shape[0 if transpose_b else 1]
    if interpreting:
        a = a[...]  # a ref, or already registers (indexing an array is a no-op)
        dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
        return jax.lax.dot_general(a, b_smem[...], dims, preferred_element_type=jnp.float32)

    def mma(acc_ref):
        b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((M, N), jnp.float32))


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, *, cfg: _Config, G: int, num_q: int):
    _cast = (lambda x, layout: x) if cfg.interpret else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    ROW = L.reduce(1)
    b, n, i = jax.lax.axis_index("b"), jax.lax.axis_index("n"), jax.lax.axis_index("q")
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    H = q_ref.shape[3]
    row = 3 * (b * num_q + i)  # meta holds (first kv tile, tile count, kv_len) per row
    first, count, kv_len = meta_ref[row], meta_ref[row + 1], meta_ref[row + 2]
    kh = jax.lax.div(n, G)
    q_rows = pl.ds(i * bq, bq)

    def scoped(qo_smem, q_barrier):
        plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, n], qo_smem, q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[0])
        # Query t sits at position S - T + t (rows of the padding never reach the output).
        row_iota = _cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0), L)
        col = _cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1), L)
        pos_q = (cfg.S - cfg.T) + i * bq + row_iota

        def body(indices, k_smem, v_smem, carry):
            (j,) = indices
            acc, m_prev, l_prev = carry

            s = _matmul(qo_smem, k_smem, transpose_b=True, interpreting=cfg.interpret) * cfg.scale
            if cfg.softcap is not None:
                s = cfg.softcap * jnp.tanh(s / cfg.softcap)
            pos_k = (first + j) * bk + col
            mask = pos_k < kv_len
            if cfg.causal:
                mask &= pos_k <= pos_q
            if cfg.sliding_window is not None:
                mask &= pos_k > pos_q - cfg.sliding_window
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            # Masked entries are zeroed explicitly: a row with no visible key yet has m_new
            # equal to MASK_VALUE, where exp(s - m_new) would be 1.
            p = jnp.where(mask, jnp.exp(s - jax.lax.broadcast_in_dim(m_new, s.shape, (0,))), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_new = alpha * l_prev + jnp.sum(p, axis=1)

            # The wgmma runs into a fresh accumulator (plus one register add): accumulating into
            # ``acc`` in place needs ``run_state``, which the interpreter cannot run.
            pv_tile = _matmul(
                p.astype(v_smem.dtype), v_smem, transpose_b=False, interpreting=cfg.interpret
            )
            acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, (0,)) + pv_tile
            return acc, m_new, l_new

        transforms = _smem_transforms(H, k_ref.dtype)
        spec = plgpu.BlockSpec((bk, H), lambda j: (first + j, 0), transforms=transforms)
        init = (
            _cast(jnp.zeros((bq, H), jnp.float32), L),
            _cast(jnp.full((bq,), MASK_VALUE, jnp.float32), ROW),
            _cast(jnp.zeros((bq,), jnp.float32), ROW),
        )
        acc, _, l_sum = plgpu.emit_pipeline(
            body,
            grid=(count,),
            in_specs=[spec, spec],
            max_concurrent_steps=cfg.block_sizes.num_stages,
            init_carry=init,
        )(k_ref.at[b, :, kh, :], v_ref.at[b, :, kh, :])
        # Rows with no visible key (l = 0) give 0, like the reference.
        inv = jnp.where(l_sum > 0.0, 1.0 / jnp.where(l_sum > 0.0, l_sum, 1.0), 0.0)
        qo_smem[...] = (acc * jax.lax.broadcast_in_dim(inv, acc.shape, (0,))).astype(o_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, q_rows, n])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((bq, H), q_ref.dtype, transforms=_smem_transforms(H, q_ref.dtype)),
        plgpu.Barrier(num_barriers=1),
    )


def _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    first_BQ, count_BQ = kv_block_ranges(
        kv_len_B, T=T, S=cfg.S, block_q=bq, block_kv=bk, causal=cfg.causal,
        sliding_window=cfg.sliding_window,
    )  # fmt: skip
    num_q = first_BQ.shape[1]
    meta = jnp.stack([first_BQ, count_BQ, jnp.broadcast_to(kv_len_B[:, None], first_BQ.shape)], -1)
    Tp = num_q * bq
    q = jnp.pad(q_BTNH, ((0, 0), (0, Tp - T), (0, 0), (0, 0))) if Tp != T else q_BTNH
    out = plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg, G=N // K, num_q=num_q),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, N, num_q),
        grid_names=("b", "n", "q"),
        interpret=_interpret_params() if cfg.interpret else None,
    )(meta.reshape(-1).astype(jnp.int32), q, k_BSKH, v_BSKH)
    return out[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    return _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    return _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg), None


def _flash_bwd(cfg: _Config, res, do_BTNH):
    raise ValueError("pallas_gpu backward not implemented yet; use impl='cudnn' or 'xla'")


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sliding_window", "softcap", "scale", "block_sizes", "interpret"),
)
def flash_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    lengths=None,
    softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """Flash attention forward on Hopper GPUs; queries are the last ``T`` of the ``S`` keys.

    Args:
      q_BTNH: queries; query ``t`` sits at position ``S - T + t``.
      k_BSKH, v_BSKH: keys and values at positions ``0..S-1``; ``N % K == 0``; same dtype as
        ``q``: float16 or bfloat16 (float32 in interpret mode only). ``H`` a multiple of 64,
        at most 256.
      causal: a query sees only keys at positions ``<=`` its own.
      sliding_window: ``w`` restricts a query at ``p`` to keys at positions ``> p - w``.
      lengths: optional int ``[B]``; keys at positions ``>= lengths[b]`` are masked.
      softcap: ``c`` applies ``c * tanh(logits / c)`` before masking.
      scale: logit scale, default ``H ** -0.5``.
      block_sizes: ``BlockSizes``; default ``BlockSizes.for_shape``.
      interpret: run the kernel in Mosaic GPU interpret mode (CPU).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``; rows with no visible key are zeros. Not
      differentiable: ``jax.grad`` raises ``ValueError``.
    """
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or k_BSKH.shape != v_BSKH.shape:
        raise ValueError(
            f"need q [B, T, N, H] and k, v [B, S, K, H] of equal shapes, got "
            f"{q_BTNH.shape}, {k_BSKH.shape}, {v_BSKH.shape}"
        )
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H or N % K:
        raise ValueError(f"q {q_BTNH.shape} vs k {k_BSKH.shape}: need equal B, H and N % K == 0")
    if not q_BTNH.dtype == k_BSKH.dtype == v_BSKH.dtype:
        raise ValueError(
            f"q, k, v must share a dtype, got {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKH.dtype}"
        )
    if not interpret and jnp.dtype(q_BTNH.dtype) not in _WGMMA_DTYPES:
        raise ValueError(
            f"pallas_gpu flash attention needs float16 or bfloat16 inputs (wgmma), got "
            f"{q_BTNH.dtype}; cast, or use impl='cudnn' or 'xla'"
        )
    if H % 64 or H > _MAX_TMA_BOX:
        raise ValueError(f"head dim H must be a multiple of 64 and <= {_MAX_TMA_BOX}, got {H}")
    if T > S:
        raise ValueError(f"more queries than keys: T={T} > S={S}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(T, S, H, q_BTNH.dtype)
    if lengths is None:
        kv_len_B = jnp.full((B,), S, jnp.int32)
    else:
        if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be an int array of shape ({B},), got {lengths.shape}")
        kv_len_B = jnp.clip(lengths.astype(jnp.int32), 0, S)
    cfg = _Config(
        T=T,
        S=S,
        causal=causal,
        sliding_window=sliding_window,
        softcap=None if softcap is None else float(softcap),
        scale=float(H**-0.5 if scale is None else scale),
        block_sizes=block_sizes,
        interpret=bool(interpret),
    )
    return _flash(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)
