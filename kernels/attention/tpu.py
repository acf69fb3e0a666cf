"""Flash attention as a Pallas Mosaic TPU kernel: forward here, backward in ``tpu_bwd.py``.

Online-softmax attention (Dao et al. 2022, arXiv:2205.14135, Algorithm 1) with float32
statistics. The ``G = N // K`` query heads that share a kv head are processed together, so
grouped-query and multi-query attention read each K/V block once and never repeat it. The
kernels see ``[B, N, T, H]`` / ``[B, K, S, H]`` (sequence and head dim as the last two, tiled
dims); the wrapper transposes and pads ``T`` and ``S`` up to the block sizes.

Masked blocks are not visited: for every (sequence, query block) the wrapper computes the
contiguous range of kv blocks that hold a visible key (causal diagonal, sliding window,
``lengths``), scalar-prefetches it, and the kv index map clamps to that range, so the grid
steps past its end neither fetch (same block index as the step before) nor compute
(``pl.when``). The backward's dk/dv kernel does the same over query blocks.

Semantics are those of ``reference.masked_attention``; on CPU run it with ``interpret=True``
(TPU interpret mode)::

    out_BTNH = flash_attention(q, k, v, causal=True, sliding_window=256, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import checks

# Finite stand-in for -inf: keeps exp(m_prev - m_new) free of inf - inf before any key is seen.
MASK_VALUE = -1e30
_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Sequence tile sizes; ``T`` and ``S`` are padded up to them, so they need not divide.

    ``block_q`` / ``block_kv`` tile the forward and the dq kernel, ``block_q_dkv`` /
    ``block_kv_dkv`` the dk/dv kernel. Each is the second-minor dim of a VMEM block, so a
    multiple of 8 (TPU sublanes); the defaults (``for_shape``) are multiples of 128.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None

    def __post_init__(self):
        if self.block_q_dkv is None:
            object.__setattr__(self, "block_q_dkv", self.block_q)
        if self.block_kv_dkv is None:
            object.__setattr__(self, "block_kv_dkv", self.block_kv)
        for f in dataclasses.fields(self):
            b = getattr(self, f.name)
            if not isinstance(b, int) or b <= 0 or b % _SUBLANES:
                raise ValueError(f"{f.name} must be a positive multiple of {_SUBLANES}, got {b!r}")

    @classmethod
    def for_shape(cls, T: int, S: int, G: int, H: int, dtype) -> BlockSizes:
        """Default tiles: multiples of 128, capped by the padded sequence lengths.

        A step holds ``[G * block_q, block_kv]`` float32 logits (and temporaries of that shape)
        plus a ``[G * block_q, H]`` float32 accumulator in VMEM, so ``block_kv`` shrinks as the
        group grows, keeping the logits tile at most ``2**19`` elements (2 MiB); 16-bit inputs
        with ``H <= 128`` may use kv tiles of 512, others 256.
        """
        block_q = min(256 if G <= 2 else 128, _round_up(T, 128))
        block_kv = 512 if (H <= 128 and jnp.dtype(dtype).itemsize <= 2) else 256
        block_kv = min(block_kv, max(128, (2**19 // (G * block_q)) // 128 * 128))
        return cls(block_q=block_q, block_kv=min(block_kv, _round_up(S, 128)))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static attributes of one call (hashable: ``custom_vjp`` non-diff argument)."""

    T: int
    S: int
    causal: bool
    sliding_window: int | None
    softcap: float | None
    scale: float
    block_sizes: BlockSizes
    interpret: bool


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def kv_block_ranges(kv_len_B, *, T, S, block_q, block_kv, causal, sliding_window, q_offset_B=None):
    """First kv block and number of kv blocks each query block must visit.

    Query ``t`` sits at position ``S - T + t`` (``q_offset_B[b] + t`` when given); the keys it
    sees form the interval ``[p - w + 1, min(p, kv_len - 1)]`` (bounds dropped without window
    / causality), and over the rows of a block the union of these intervals is contiguous.

    Returns:
      ``(first_BQ, count_BQ)`` int32 ``[B, ceil(T / block_q)]``; ``count`` 0 means skip all.
      Works on jnp and numpy ``kv_len_B`` alike.
    """
    xp = np if isinstance(kv_len_B, np.ndarray) else jnp
    num_q = -(-T // block_q)
    t0 = xp.arange(num_q, dtype=np.int32) * block_q
    offset = (S - T) if q_offset_B is None else q_offset_B[:, None]
    p_lo = offset + t0
    p_hi = offset + xp.minimum(t0 + block_q, T) - 1
    lo = p_lo - sliding_window + 1 if sliding_window is not None else xp.zeros_like(p_lo)
    lo = xp.maximum(lo, 0)
    hi_BQ = xp.broadcast_to(kv_len_B[:, None], (kv_len_B.shape[0], num_q))  # exclusive
    if causal:
        hi_BQ = xp.minimum(hi_BQ, p_hi + 1)
    lo_BQ = xp.broadcast_to(lo, hi_BQ.shape)
    first = lo_BQ // block_kv
    count = xp.where(hi_BQ > lo_BQ, -(-hi_BQ // block_kv) - first, 0)
    return first.astype(np.int32), count.astype(np.int32)


def q_block_ranges(kv_len_B, *, T, S, block_q, block_kv, causal, sliding_window):
    """First query block and number of query blocks that see each kv block (dk/dv kernel).

    Key ``s`` is seen by queries at positions ``s <= p`` (causal) and ``p < s + w`` (window).

    Returns:
      ``(first_BK, count_BK)`` int32 ``[B, ceil(S / block_kv)]``.
    """
    xp = np if isinstance(kv_len_B, np.ndarray) else jnp
    num_kv = -(-S // block_kv)
    s_lo = xp.arange(num_kv, dtype=np.int32) * block_kv
    s_hi_BK = xp.minimum(s_lo[None, :] + block_kv, kv_len_B[:, None]) - 1  # last valid key
    t_lo = xp.maximum(s_lo - (S - T), 0) if causal else xp.zeros_like(s_lo)
    t_hi_BK = xp.full_like(s_hi_BK, T - 1)
    if sliding_window is not None:
        t_hi_BK = xp.minimum(t_hi_BK, s_hi_BK + sliding_window - 1 - (S - T))
    first = xp.minimum(t_lo // block_q, max(-(-T // block_q) - 1, 0))[None, :]
    valid = (s_hi_BK >= s_lo[None, :]) & (t_hi_BK >= t_lo[None, :])
    count = xp.where(valid, t_hi_BK // block_q + 1 - first, 0)
    return (first + xp.zeros_like(count)).astype(np.int32), count.astype(np.int32)


def static_num_steps(first_count_fn, *, T, S, **kw) -> int:
    """Grid length of the reduction axis: the most blocks any row visits with ``lengths = S``."""
    _, count = first_count_fn(np.array([S], np.int32), T=T, S=S, **kw)
    return max(int(count.max()), 1)


def visible(q_blk, kv_blk, kv_len, cfg: _Config, bq: int, bk: int):
    """Boolean ``[bq, bk]`` mask of one (query block, kv block) tile, as ``reference.key_mask``."""
    t = q_blk * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    s = kv_blk * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    p = (cfg.S - cfg.T) + t
    mask = (s < kv_len) & (t < cfg.T)
    if cfg.causal:
        mask &= s <= p
    if cfg.sliding_window is not None:
        mask &= s > p - cfg.sliding_window
    return mask


def logits(q_RH, k_CH, cfg: _Config):
    """Scaled, soft-capped ``q k^T`` in float32, and ``tanh(s / c)`` (the cap's derivative)."""
    s = jax.lax.dot_general(
        q_RH, k_CH, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    s = s * cfg.scale
    if cfg.softcap is None:
        return s, None
    th = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * th, th


def to_kernel_layout(x_BLXH, block: int):
    """``[B, L, X, H]`` -> ``[B, X, L_padded, H]`` with ``L`` padded to a multiple of ``block``."""
    x = jnp.swapaxes(x_BLXH, 1, 2)
    pad = _round_up(x.shape[2], block) - x.shape[2]
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x


# Batch, kv-head and the outer block axis are independent (megacore may split them); the
# innermost axis carries the online-softmax / gradient accumulators.
COMPILER_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
)


def interpret_arg(cfg: _Config):
    return pltpu.InterpretParams() if cfg.interpret else False


def _fwd_kernel(
    kv_len_ref, first_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
    cfg: _Config, num_steps: int,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    G, bq, H = q_ref.shape
    bk = k_ref.shape[0]
    row = b * pl.num_programs(2) + i

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(j < count_ref[row])
    def _step():
        kv_blk = first_ref[row] + j
        s, _ = logits(q_ref[...].reshape(G * bq, H), k_ref[...], cfg)
        mask = visible(i, kv_blk, kv_len_ref[b], cfg, bq, bk)[None]
        s = jnp.where(mask, s.reshape(G, bq, bk), MASK_VALUE).reshape(G * bq, bk)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Masked entries are zeroed explicitly: a row with no visible key yet has m_new equal
        # to MASK_VALUE, where exp(s - m_new) would be 1.
        p = jnp.where(mask, jnp.exp(s - m_new).reshape(G, bq, bk), 0.0).reshape(G * bq, bk)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    @pl.when(j == num_steps - 1)
    def _finish():
        denom = l_sc[...]
        seen = denom > 0.0  # rows with no visible key: output 0 like the reference
        denom = jnp.where(seen, denom, 1.0)
        inv = jnp.where(seen, 1.0 / denom, 0.0)
        o_ref[...] = (acc_sc[...] * inv).reshape(G, bq, H).astype(o_ref.dtype)
        lse = jnp.where(seen, m_sc[...] + jnp.log(denom), 0.0)
        lse_ref[...] = lse.reshape(G, bq, 1)


def _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    """Returns ``out [B, T, N, H]`` and ``lse [B, N, T_padded, 1]`` float32."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    ranges = functools.partial(
        kv_block_ranges, T=T, S=S, block_q=bq, block_kv=bk, causal=cfg.causal,
        sliding_window=cfg.sliding_window,
    )  # fmt: skip
    first_BQ, count_BQ = ranges(kv_len_B)
    num_steps = static_num_steps(kv_block_ranges, **ranges.keywords)
    q = to_kernel_layout(q_BTNH, bq)
    k, v = to_kernel_layout(k_BSKH, bk), to_kernel_layout(v_BSKH, bk)
    Tp = q.shape[2]

    def kv_map(b, h, i, j, kv_len, first, count):
        row = b * (Tp // bq) + i
        return b, h, first[row] + jnp.minimum(j, jnp.maximum(count[row] - 1, 0)), 0

    q_spec = pl.BlockSpec((pl.Squeezed(), G, bq, H), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), bk, H), kv_map)
    lse_spec = pl.BlockSpec((pl.Squeezed(), G, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, num_steps=num_steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, K, Tp // bq, num_steps),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=[q_spec, lse_spec],
            scratch_shapes=[
                pltpu.VMEM((G * bq, 1), jnp.float32),
                pltpu.VMEM((G * bq, 1), jnp.float32),
                pltpu.VMEM((G * bq, H), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32),
        ],
        compiler_params=COMPILER_PARAMS,
        interpret=interpret_arg(cfg),
        name="flash_attention_fwd",
    )(kv_len_B, first_BQ.reshape(-1), count_BQ.reshape(-1), q, k, v)
    return jnp.swapaxes(out[:, :, :T], 1, 2), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    return _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)[0]


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg: _Config):
    out, lse = _forward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)
    return out, (q_BTNH, k_BSKH, v_BSKH, kv_len_B, out, lse[:, :, : cfg.T, 0])


def _flash_bwd(cfg: _Config, res, do_BTNH):
    # Imported here: tpu_bwd builds on the helpers of this module.
    from kernels.attention import tpu_bwd

    q, k, v, kv_len_B, out, lse_BNT = res
    dq, dk, dv = tpu_bwd.backward(q, k, v, kv_len_B, out, lse_BNT, do_BTNH, cfg)
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
    """Flash attention on TPU; queries are the last ``T`` of the ``S`` key positions.

    Args:
      q_BTNH: queries; query ``t`` sits at position ``S - T + t``.
      k_BSKH, v_BSKH: keys and values at positions ``0..S-1``; ``N % K == 0``.
      causal: a query sees only keys at positions ``<=`` its own.
      sliding_window: ``w`` restricts a query at ``p`` to keys at positions ``> p - w``.
      lengths: optional int ``[B]``; keys at positions ``>= lengths[b]`` are masked.
      softcap: ``c`` applies ``c * tanh(logits / c)`` before masking.
      scale: logit scale, default ``H ** -0.5``.
      block_sizes: ``BlockSizes``; default ``BlockSizes.for_shape``.
      interpret: run the kernels in TPU interpret mode (CPU).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``; rows with no visible key are zeros.
    """
    checks.check_flash(q_BTNH, k_BSKH, v_BSKH, sliding_window, softcap)
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if T > S:
        raise ValueError(f"more queries than keys: T={T} > S={S}")
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(T, S, N // K, H, q_BTNH.dtype)
    kv_len_B = checks.kv_lengths(lengths, B, S)
    cfg = _Config(
        T=T,
        S=S,
        causal=causal,
        sliding_window=sliding_window,
        softcap=None if softcap is None else float(softcap),
        scale=float(H**-0.5 if scale is None else scale),
        block_sizes=block_sizes,
        interpret=interpret,
    )
    return _flash(q_BTNH, k_BSKH, v_BSKH, kv_len_B, cfg)
