"""Flash attention forward as Pallas Mosaic GPU (Hopper) kernels.

Online-softmax attention (Dao et al. 2022, arXiv:2205.14135, Algorithm 1) with float32
statistics. The grid is ``(B, N, ceil(T / rows))``; a program holds query tiles of one query
head in SMEM and streams the ``[block_kv, H]`` K/V tiles of its kv head ``n // G`` (GQA/MQA
without repeating K/V) from HBM through a TMA pipeline of ``num_stages`` SMEM buffers. Both
matmuls are warpgroup MMAs (``plgpu.wgmma``): ``Q K^T`` from SMEM into a float32 accumulator,
``P V`` with ``P`` cast to the input dtype in registers. Two kernels share that tile step
(``attend_tile``):

- one warpgroup of ``block_q = 64`` rows that issues its own copies (``plgpu.emit_pipeline``);
  the kernel for ``H = 256`` and for interpret mode;
- warp-specialized, in the manner of FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608):
  two compute warpgroups of 64 rows each share every K/V tile, which a third, producer
  warpgroup fetches (``plgpu.emit_pipeline_warp_specialized``; the producer gives its registers
  to the compute warpgroups). The default for ``H <= 128``: 128-key tiles, three stages.

Masked tiles are never fetched: per (sequence, query block) the wrapper computes the contiguous
range of kv tiles holding a visible key (causal diagonal, sliding window, ``lengths``;
``tpu.kv_block_ranges``) and the pipeline's step count is that run-time count. Within the
range, only tiles that straddle a mask boundary pay for the per-element mask (a ``lax.cond``);
logits live in base 2 so that each element costs one fused multiply-add and one ``exp2``.

``T`` is padded up to the rows of a program in the wrapper (a copy of ``q`` only); ``S`` is
padded to a multiple of 8 only when it is not one (the TMA tiling needs it); the partial last
K/V tile relies on TMA's out-of-bounds zero fill (interpret mode is told to fill zeros too) and
its keys are masked. Semantics are those of ``reference.masked_attention``. The backward
(``gpu_bwd.py``) rebuilds ``P`` from the forward's log-sum-exp, which the forward writes when
differentiated.

float16 / bfloat16 only on GPU: a float32 (tf32) wgmma takes neither ``P`` from registers nor
``V`` MN-major. Mosaic GPU interpret mode (CPU) runs the one-warpgroup kernel except its
wgmmas: its wgmma rule takes neither transposed SMEM refs nor register operands, so
``_matmul`` swaps in a float32 ``dot_general`` when interpreting (float32 inputs then work too),
and the layout casts, which it has no rule for, are skipped. Validated on CPU in interpret mode
and by cross-lowering for CUDA (``tests/kernels/test_attention_gpu.py``), and on one H100 by
``python -m kernels.gpucheck`` (README, "Measured")::

    out_BTNH = flash_attention(q, k, v, causal=True, sliding_window=256, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import checks
from kernels.attention.tpu import kv_block_ranges

# Finite stand-in for -inf: keeps exp(m_prev - m_new) free of inf - inf before any key is seen.
MASK_VALUE = -1e30
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Interior tiles (every key visible to every row) skip the mask; False masks every tile.
SKIP_INTERIOR_MASKS = True
# On GPU the P V wgmma accumulates into the rescaled output in place (no zeroed accumulator,
# no register add); False uses a fresh accumulator as interpret mode does.
ACCUMULATE_IN_PLACE = True
_MAX_TMA_BOX = 256
_SMEM_LIMIT = 227 * 1024  # per block on H100 (sharedMemPerBlockOptin)
# float32 would be a tf32 wgmma, which takes neither a register A operand (P) nor an
# MN-major B operand (V); only interpret mode, whose matmuls are dot_generals, runs float32.
WGMMA_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


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
      block_q: query rows per compute warpgroup; a multiple of 64 (the rows of one wgmma).
      block_kv: keys per K/V tile; a multiple of 64, at most 256 (one TMA box).
      num_stages: SMEM buffers of the K/V TMA pipeline (copies in flight).
      compute_warpgroups: 1 runs one warpgroup that issues its own copies; 2 runs the
        warp-specialized kernel (FlashAttention-3 style, Shah et al. 2024, arXiv:2407.08608):
        two compute warpgroups on ``2 * block_q`` rows share each K/V tile, which a third,
        producer warpgroup fetches with TMA, and the compute warpgroups get its registers.
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    compute_warpgroups: int = 1

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % 64 or b > _MAX_TMA_BOX:
                raise ValueError(
                    f"{name} must be a positive multiple of 64 and <= {_MAX_TMA_BOX}, got {b!r}"
                )
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.compute_warpgroups not in (1, 2):
            raise ValueError(f"compute_warpgroups must be 1 or 2, got {self.compute_warpgroups}")

    @property
    def rows(self) -> int:
        """Query rows per program."""
        return self.block_q * self.compute_warpgroups

    @classmethod
    def for_shape(cls, T: int, S: int, H: int, dtype, interpret: bool = False) -> BlockSizes:
        """The tiling measured fastest on H100 (``kernels.gpucheck``, README): the
        warp-specialized kernel with three stages of 128-key tiles for ``H <= 128``; one
        warpgroup and 64-key tiles for ``H = 256`` (register room) and in interpret mode (which
        runs one warpgroup only). Tiles are capped by ``S`` rounded up to 64."""
        block_kv = 128 if H * jnp.dtype(dtype).itemsize <= 256 else 64
        block_kv = min(block_kv, -(-S // 64) * 64)
        if interpret or H > 128:
            return cls(block_q=64, block_kv=block_kv, num_stages=2)
        return cls(block_q=64, block_kv=block_kv, num_stages=3, compute_warpgroups=2)


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


def smem_transforms(H: int, dtype):
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


def attend_tile(q, k_smem, v_smem, carry, mask, *, scale, softcap, interpreting):
    """One online-softmax step (Dao et al. 2022, Algorithm 1) over a ``[bk, H]`` K/V tile.

    ``q`` is the ``[R, H]`` query tile (SMEM ref), ``carry`` the float32 ``(acc [R, H], max [R],
    sum [R])`` in the WGMMA register layouts and ``mask`` the ``[R, bk]`` visible keys, or
    ``None`` for a tile whose keys all rows see (no per-element select). Logits are
    ``softcap(scale * q k)``, kept in base 2 (times ``log2 e``, so the max is too) so that each
    element costs one fused multiply-add and one ``exp2``; ``P`` is cast to the input dtype for
    the ``P V`` wgmma.
    """
    acc, m_prev, l_prev = carry
    s = _matmul(q, k_smem, transpose_b=True, interpreting=interpreting)
    if softcap is not None:
        s = (softcap * LOG2E) * jnp.tanh(s * (scale / softcap))
        c = 1.0
    else:
        c = scale * LOG2E  # applied inside the exponent below (scale > 0 keeps the max)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE / c)  # MASK_VALUE once scaled
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1) * c)
    # A row with no visible key yet keeps m near MASK_VALUE: subtracting 0 there instead makes
    # its masked entries exp2(MASK_VALUE) = 0 rather than exp2(0) = 1.
    m_use = jnp.where(m_new < 0.5 * MASK_VALUE, 0.0, m_new)
    p = jnp.exp2(s * c - jax.lax.broadcast_in_dim(m_use, s.shape, (0,)))
    alpha = jnp.exp2(m_prev - m_use)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, (0,))
    p = p.astype(v_smem.dtype)
    if interpreting or not ACCUMULATE_IN_PLACE:
        # A fresh accumulator plus a register add: the interpreter cannot run ``run_state``.
        return acc + _matmul(p, v_smem, transpose_b=False, interpreting=interpreting), m_new, l_new

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem)

    return pl.run_state(pv)(plgpu.ACC.init(acc)), m_new, l_new


def attend_tile_masked_if(partial, mask_fn, q, k_smem, v_smem, carry, **kw):
    """``attend_tile`` with the mask applied only when the scalar ``partial`` says the tile has
    invisible keys (a ``lax.cond``): interior tiles skip the per-element select. Set
    ``SKIP_INTERIOR_MASKS = False`` to mask every tile."""
    if not SKIP_INTERIOR_MASKS:
        return attend_tile(q, k_smem, v_smem, carry, mask_fn(), **kw)
    return jax.lax.cond(
        partial,
        lambda c: attend_tile(q, k_smem, v_smem, c, mask_fn(), **kw),
        lambda c: attend_tile(q, k_smem, v_smem, c, None, **kw),
        carry,
    )


def normalize(acc, l_sum):
    """``acc / l`` per row; rows with no visible key (``l = 0``) give 0, like the reference."""
    inv = jnp.where(l_sum > 0.0, 1.0 / jnp.where(l_sum > 0.0, l_sum, 1.0), 0.0)
    return acc * jax.lax.broadcast_in_dim(inv, acc.shape, (0,))


def pad_keys(k_BSKH, v_BSKH):
    """Pads ``S`` to a multiple of 8 (a copy, only when needed): the TMA tiling of a K/V tile
    needs it on the hardware. Callers mask the padded keys (they lie past every length)."""
    S = k_BSKH.shape[1]
    if S % 8 == 0:
        return k_BSKH, v_BSKH
    pad = ((0, 0), (0, -S % 8), (0, 0), (0, 0))
    return jnp.pad(k_BSKH, pad), jnp.pad(v_BSKH, pad)


def _program(G: int):
    """(sequence, query head, query block, kv head) of this program."""
    b, n, i = jax.lax.axis_index("b"), jax.lax.axis_index("n"), jax.lax.axis_index("q")
    return b, n, i, jax.lax.div(n, G)


def _meta(meta_ref, row):
    """(first kv tile, tile count, kv_len, position of query 0) of a (sequence, query block)."""
    return tuple(meta_ref[4 * row + c] for c in range(4))


def _tile_is_partial(cfg: _Config, q_first, q_last, k_first, bk, kv_len):
    """Whether some key of tile ``[k_first, k_first + bk)`` is invisible to some query at
    positions ``q_first..q_last`` (scalars)."""
    partial = k_first + bk > kv_len
    if cfg.causal:
        partial |= k_first + bk - 1 > q_first
    if cfg.sliding_window is not None:
        partial |= k_first <= q_last - cfg.sliding_window
    return partial


def _tile_mask(cfg: _Config, pos_q, pos_k, kv_len):
    """Visible keys of a ``[rows, bk]`` tile from the query and key positions."""
    mask = pos_k < kv_len
    if cfg.causal:
        mask &= pos_k <= pos_q
    if cfg.sliding_window is not None:
        mask &= pos_k > pos_q - cfg.sliding_window
    return mask


def _lse(m, l_sum):
    """Natural log-sum-exp of a row from ``attend_tile``'s base-2 max and sum (0 when empty)."""
    return jnp.where(l_sum > 0.0, (m + jnp.log2(jnp.where(l_sum > 0.0, l_sum, 1.0))) * LN2, 0.0)


def _write_rows(qo_smem, lse_smem, acc, m, l_sum, o_ref, lse_ref, b, n, q_rows):
    """The normalised output tile (through the query's SMEM) and, when asked, its lse row."""
    qo_smem[...] = normalize(acc, l_sum).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_smem[...] = _lse(m, l_sum)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, q_rows, n])
    if lse_ref is not None:
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, n, q_rows])
    plgpu.wait_smem_to_gmem(0)


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, *rest, cfg: _Config, G: int, num_q: int):
    lse_ref = rest[0] if rest else None
    _cast = (lambda x, layout: x) if cfg.interpret else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    ROW = L.reduce(1)
    b, n, i, kh = _program(G)
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    H = q_ref.shape[3]
    first, count, kv_len, q_off = _meta(meta_ref, b * num_q + i)
    q_rows = pl.ds(i * bq, bq)

    def scoped(qo_smem, q_barrier, *lse_smem):
        plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, n], qo_smem, q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[0])
        # Query t sits at position q_off + t (rows of the padding never reach the output).
        row_iota = _cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0), L)
        col = _cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1), L)
        pos_q = q_off + i * bq + row_iota

        def body(indices, k_smem, v_smem, carry):
            (j,) = indices
            k_first = (first + j) * bk
            q_first = q_off + i * bq
            return attend_tile_masked_if(
                _tile_is_partial(cfg, q_first, q_first + bq - 1, k_first, bk, kv_len),
                lambda: _tile_mask(cfg, pos_q, k_first + col, kv_len),
                qo_smem, k_smem, v_smem, carry, scale=cfg.scale, softcap=cfg.softcap,
                interpreting=cfg.interpret,
            )  # fmt: skip

        transforms = smem_transforms(H, k_ref.dtype)
        spec = plgpu.BlockSpec((bk, H), lambda j: (first + j, 0), transforms=transforms)
        init = (
            _cast(jnp.zeros((bq, H), jnp.float32), L),
            _cast(jnp.full((bq,), MASK_VALUE, jnp.float32), ROW),
            _cast(jnp.zeros((bq,), jnp.float32), ROW),
        )
        acc, m, l_sum = plgpu.emit_pipeline(
            body,
            grid=(count,),
            in_specs=[spec, spec],
            max_concurrent_steps=cfg.block_sizes.num_stages,
            init_carry=init,
        )(k_ref.at[b, :, kh, :], v_ref.at[b, :, kh, :])
        lse = lse_smem[0] if lse_smem else None
        _write_rows(qo_smem, lse, acc, m, l_sum, o_ref, lse_ref, b, n, q_rows)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((bq, H), q_ref.dtype, transforms=smem_transforms(H, q_ref.dtype)),
        plgpu.Barrier(num_barriers=1),
        *([plgpu.SMEM((bq,), jnp.float32)] if lse_ref is not None else []),
    )


def _fwd_kernel_ws(meta_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, G: int, num_q: int):
    """Warp-specialized forward: warpgroups 0 and 1 compute ``block_q`` rows each, warpgroup 2
    streams the K/V tiles both of them read (``plgpu.emit_pipeline_warp_specialized``)."""
    if len(refs) == 5:
        o_ref, lse_ref, qo_smem, q_barrier, lse_smem = refs
    else:
        (o_ref, qo_smem, q_barrier), lse_ref, lse_smem = refs, None, None
    L = plgpu.Layout.WGMMA
    ROW = L.reduce(1)
    b, n, i, kh = _program(G)
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    H = q_ref.shape[3]
    first, count, kv_len, q_off = _meta(meta_ref, b * num_q + i)

    def compute(pipeline):
        wg = jax.lax.axis_index("wg")
        q_rows = pl.ds(i * (2 * bq) + wg * bq, bq)
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, n], q_smem, q_barrier.at[wg])
        plgpu.barrier_wait(q_barrier.at[wg])
        init = (
            plgpu.layout_cast(jnp.zeros((bq, H), jnp.float32), L),
            plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), ROW),
            plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), ROW),
        )
        acc, m, l_sum = pipeline(init)
        lse = None if lse_smem is None else lse_smem.at[wg]
        _write_rows(q_smem, lse, acc, m, l_sum, o_ref, lse_ref, b, n, q_rows)

    def body(indices, k_smem, v_smem, carry):
        (j,) = indices
        wg = jax.lax.axis_index("wg")
        row_iota = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0), L)
        col = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1), L)
        q_first = q_off + i * (2 * bq) + wg * bq
        k_first = (first + j) * bk
        return attend_tile_masked_if(
            _tile_is_partial(cfg, q_first, q_first + bq - 1, k_first, bk, kv_len),
            lambda: _tile_mask(cfg, q_first + row_iota, k_first + col, kv_len),
            qo_smem.at[wg], k_smem, v_smem, carry, scale=cfg.scale, softcap=cfg.softcap,
            interpreting=False,
        )  # fmt: skip

    spec = plgpu.BlockSpec(
        (bk, H), lambda j: (first + j, 0), transforms=smem_transforms(H, k_ref.dtype)
    )
    plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(count,),
        memory_registers=40,
        in_specs=[spec, spec],
        max_concurrent_steps=cfg.block_sizes.num_stages,
        wg_axis="wg",
        num_compute_wgs=2,
        compute_context=compute,
    )(k_ref.at[b, :, kh, :], v_ref.at[b, :, kh, :])


def _smem_bytes(bs: BlockSizes, H: int, dtype, with_lse: bool) -> int:
    """SMEM of one forward program: query tiles, K/V stages, lse rows, ~3 KiB of barriers and
    alignment (as measured against Mosaic GPU's own count)."""
    itemsize = jnp.dtype(dtype).itemsize
    tiles = (bs.rows + 2 * bs.num_stages * bs.block_kv) * H * itemsize
    return tiles + (4 * bs.rows if with_lse else 0) + 3 * 1024


def _forward(
    q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config, with_lse: bool = False, q_offset_B=None
):
    """``out [B, T, N, H]``, and ``lse [B, N, T]`` (float32, natural log) ``with_lse``. Query
    ``t`` sits at position ``S - T + t``, or ``q_offset_B[b] + t`` when given."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    bs = cfg.block_sizes
    while with_lse and bs.num_stages > 1 and _smem_bytes(bs, H, q_BTNH.dtype, True) > _SMEM_LIMIT:
        bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)  # room for the lse rows
    cfg = dataclasses.replace(cfg, block_sizes=bs)
    rows, bk = cfg.block_sizes.rows, cfg.block_sizes.block_kv
    first_BQ, count_BQ = kv_block_ranges(
        kv_len_B, T=T, S=cfg.S, block_q=rows, block_kv=bk, causal=cfg.causal,
        sliding_window=cfg.sliding_window, q_offset_B=q_offset_B,
    )  # fmt: skip
    num_q = first_BQ.shape[1]
    if q_offset_B is None:
        q_offset_B = jnp.full((B,), cfg.S - T, jnp.int32)
    per_row = (kv_len_B, q_offset_B)
    meta = jnp.stack(
        [first_BQ, count_BQ, *(jnp.broadcast_to(x[:, None], (B, num_q)) for x in per_row)], -1
    )
    Tp = num_q * rows
    q = jnp.pad(q_BTNH, ((0, 0), (0, Tp - T), (0, 0), (0, 0))) if Tp != T else q_BTNH
    k_BSKH, v_BSKH = pad_keys(k_BSKH, v_BSKH)
    kw = {}
    kernel = _fwd_kernel
    if cfg.block_sizes.compute_warpgroups == 2:
        if cfg.interpret:
            raise ValueError("compute_warpgroups=2 has no interpret mode; use 1")
        kernel = _fwd_kernel_ws
        bq = cfg.block_sizes.block_q
        kw = dict(
            num_threads=3,
            thread_name="wg",
            scratch_types=[
                plgpu.SMEM((2, bq, H), q.dtype, transforms=smem_transforms(H, q.dtype)),
                plgpu.Barrier(num_barriers=2),
                *([plgpu.SMEM((2, bq), jnp.float32)] if with_lse else []),
            ],
        )
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_lse:
        out_type.append(jax.ShapeDtypeStruct((B, N, Tp), jnp.float32))
    outs = plgpu.kernel(
        functools.partial(kernel, cfg=cfg, G=N // K, num_q=num_q),
        out_type=tuple(out_type),
        grid=(B, N, num_q),
        grid_names=("b", "n", "q"),
        interpret=_interpret_params() if cfg.interpret else None,
        **kw,
    )(meta.reshape(-1).astype(jnp.int32), q, k_BSKH, v_BSKH)
    if with_lse:
        return outs[0][:, :T], outs[1][:, :, :T]
    return outs[0][:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    return _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    out, lse_BNT = _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg, with_lse=True)
    return out, (q_BTNH, k_BSKH, v_BSKH, kv_len_B, out, lse_BNT)


def _flash_bwd(cfg: _Config, res, do_BTNH):
    # Imported here: gpu_bwd builds on the helpers of this module.
    from kernels.attention import gpu_bwd

    q, k, v, kv_len_B, out, lse_BNT = res
    dq, dk, dv = gpu_bwd.backward(q, k, v, kv_len_B, out, lse_BNT, do_BTNH, cfg)
    return dq, dk, dv, None


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
    """Flash attention on Hopper GPUs; queries are the last ``T`` of the ``S`` keys.

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
      ``[B, T, N, H]`` in the dtype of ``q``; rows with no visible key are zeros.
      Differentiable: the backward is ``gpu_bwd.backward``.
    """
    _check_inputs(q_BTNH, k_BSKH, v_BSKH, sliding_window, softcap, interpret)
    B, T, _, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if T > S:
        raise ValueError(f"more queries than keys: T={T} > S={S}")
    kv_len_B = checks.kv_lengths(lengths, B, S)
    cfg = _config(q_BTNH, S, causal, sliding_window, softcap, scale, block_sizes, interpret)
    return _flash(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)


def _check_inputs(q_BTNH, k_BSKH, v_BSKH, sliding_window, softcap, interpret) -> None:
    checks.check_flash(q_BTNH, k_BSKH, v_BSKH, sliding_window, softcap)
    if not q_BTNH.dtype == k_BSKH.dtype == v_BSKH.dtype:
        raise ValueError(
            f"q, k, v must share a dtype, got {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKH.dtype}"
        )
    if not interpret and jnp.dtype(q_BTNH.dtype) not in WGMMA_DTYPES:
        raise ValueError(
            f"pallas_gpu flash attention needs float16 or bfloat16 inputs (wgmma), got "
            f"{q_BTNH.dtype}; cast, or use impl='cudnn' or 'xla'"
        )
    H = q_BTNH.shape[3]
    if H % 64 or H > _MAX_TMA_BOX:
        raise ValueError(f"head dim H must be a multiple of 64 and <= {_MAX_TMA_BOX}, got {H}")


def _config(q_BTNH, S, causal, sliding_window, softcap, scale, block_sizes, interpret):
    _, T, _, H = q_BTNH.shape
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(T, S, H, q_BTNH.dtype, interpret=interpret)
    return _Config(
        T=T,
        S=S,
        causal=causal,
        sliding_window=sliding_window,
        softcap=None if softcap is None else float(softcap),
        scale=float(H**-0.5 if scale is None else scale),
        block_sizes=block_sizes,
        interpret=bool(interpret),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunk(q_BTNH, k_BSKH, v_BSKH, kv_len_B, starts_B, cfg: _Config):
    return _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg, q_offset_B=starts_B)


def _chunk_fwd(q_BTNH, k_BSKH, v_BSKH, kv_len_B, starts_B, cfg: _Config):
    return _chunk(q_BTNH, k_BSKH, v_BSKH, kv_len_B, starts_B, cfg), None


def _chunk_bwd(cfg: _Config, res, do_BTNH):
    raise ValueError(
        "pallas_gpu cached_attention is inference-only (no gradient); train with attention()"
    )


_chunk.defvjp(_chunk_fwd, _chunk_bwd)


@functools.partial(
    jax.jit, static_argnames=("sliding_window", "softcap", "scale", "block_sizes", "interpret")
)
def cached_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    starts_B,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """A chunk of ``T`` new queries per sequence against a ``[B, S, K, H]`` KV cache (chunked
    prefill, speculative verification): query ``t`` of sequence ``b`` sits at position
    ``starts[b] + t`` and sees cache positions ``< lengths[b]`` causally (and within the
    window). The flash forward with a per-sequence query offset; masked tiles are skipped as
    there. Inference only: ``jax.grad`` raises ``ValueError``.

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``; rows with no visible key are zeros.
    """
    _check_inputs(q_BTNH, k_BSKH, v_BSKH, sliding_window, softcap, interpret)
    B, S = q_BTNH.shape[0], k_BSKH.shape[1]
    kv_len_B = checks.kv_lengths(lengths_B, B, S, "lengths_B")
    if starts_B.shape != (B,) or not jnp.issubdtype(starts_B.dtype, jnp.integer):
        raise ValueError(f"starts_B must be an int array of shape ({B},), got {starts_B.shape}")
    cfg = _config(q_BTNH, S, True, sliding_window, softcap, scale, block_sizes, interpret)
    return _chunk(q_BTNH, k_BSKH, v_BSKH, kv_len_B, starts_B.astype(jnp.int32), cfg)
