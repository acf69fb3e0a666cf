"""Decode attention as a Pallas Mosaic TPU kernel: one query per sequence against a KV cache.

Split-K ("flash-decoding", Dao et al. 2023, https://pytorch.org/blog/flash-decoding/) over the
model's cache layout ``[B, S, K, H]``: the grid is ``(B, K // hb, P, steps)``. Each program holds
the queries of ``hb`` kv heads (``hb * G`` rows, ``G = N // K``) and streams ``[block_s, hb * H]``
K/V tiles, so a tile is read from HBM once for every query head of its group (GQA/MQA as in
Pope et al. 2022 §3.3). The visible key range of each sequence is split evenly over ``P``
partitions at run time; each partition keeps float32 online-softmax statistics (max, sum,
unnormalised output) and a jnp combine in the wrapper merges them.

Why ``hb`` kv heads per tile: Mosaic needs a block's last two dims to be multiples of (8, 128)
or whole array dims, so a ``(1, block_s, 1, H)`` block of ``[B, S, K, H]`` is rejected unless
``K == 1``. The cache is instead viewed as ``[B, S, K * H]`` (a free reshape) and blocked as
``(1, block_s, hb * H)``, a strided window of ``hb`` heads. With ``H % 128 == 0``
the default is ``hb = 1`` (one ``[block_s, H]`` tile per kv head). With ``H = 64`` a tile spans
``hb = 2`` heads; the kernel then multiplies a block-diagonal ``[hb * G, hb * H]`` query (built
in the wrapper) with the whole tile, so no unaligned lane slicing happens in the kernel, at
``hb`` times the (negligible, memory-bound) MXU work; the wrapper keeps the diagonal blocks.

Blocks outside ``[max(0, len - w), len)`` are neither fetched nor computed: the K/V index_map
clamps the block index with the scalar-prefetched bounds (a repeated block index is not
re-fetched by the pipeline) and ``pl.when`` skips the compute. ``S`` need not be a multiple of
``block_s``: positions past the bounds (including the padding of a partial last block) are
masked in the logits and zeroed in V, so garbage there never reaches the output.

``decode_attention_int8`` reads an int8 cache with per-token-per-head float scales and
dequantises in VMEM (the scales of a tile are picked per query row by a one-hot matmul).

Validated on CPU in TPU interpret mode and by cross-lowering to Mosaic for TPU
(``tests/kernels/test_decode_tpu.py``); not yet compiled or run on TPU hardware. Example::

    out_BNH = decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import checks

_LANES = 128
_TILE_BYTES = 256 * 1024  # target bytes of one K (or V) tile; x2 (K, V) x2 (double buffer)
_MAX_BLOCK_S = 1024
_TARGET_PROGRAMS = 4  # enough parallel programs to feed two TensorCores (megacore, v7x)


def _sublanes(dtype) -> int:
    """Rows of one native (sublane, lane) tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiling of the decode kernel.

    Attributes:
      block_s: cache positions per K/V tile; a multiple of 8 (16 for 16-bit, 32 for int8 caches).
      num_partitions: ``P``, sequence partitions computed in parallel and then combined.
      kv_heads_per_block: ``hb`` kv heads per tile; ``K % hb == 0`` and ``hb * H`` a multiple
        of 128 unless ``hb == K``.
    """

    block_s: int
    num_partitions: int = 1
    kv_heads_per_block: int = 1

    def __post_init__(self):
        if self.block_s < 8 or self.block_s % 8:
            raise ValueError(f"block_s must be a positive multiple of 8, got {self.block_s}")
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if self.kv_heads_per_block < 1:
            raise ValueError(f"kv_heads_per_block must be >= 1, got {self.kv_heads_per_block}")

    def check(self, *, K: int, H: int, dtype) -> None:
        """Raises if these sizes do not tile a ``[B, S, K, H]`` cache of ``dtype``."""
        hb, rows = self.kv_heads_per_block, _sublanes(dtype)
        if K % hb:
            raise ValueError(f"kv_heads_per_block={hb} does not divide K={K}")
        if (hb * H) % _LANES and hb != K:
            raise ValueError(
                f"kv_heads_per_block * H = {hb} * {H} must be a multiple of {_LANES} "
                f"(or kv_heads_per_block must equal K={K})"
            )
        if self.block_s % rows:
            raise ValueError(
                f"block_s={self.block_s} must be a multiple of {rows} "
                f"for a {jnp.dtype(dtype)} cache"
            )

    @classmethod
    def default(cls, *, B: int, S: int, K: int, H: int, dtype) -> DecodeBlockSizes:
        """Tiles of about 256 KiB (<= 1024 rows), <= S rounded up; ~4 parallel programs."""
        hb = next((d for d in range(1, K + 1) if K % d == 0 and (d * H) % _LANES == 0), K)
        rows = _sublanes(dtype)
        row_bytes = hb * H * jnp.dtype(dtype).itemsize
        block_s = max(rows, min(_MAX_BLOCK_S, _TILE_BYTES // row_bytes))
        block_s = 1 << (block_s.bit_length() - 1)  # a power of two >= rows
        block_s = min(block_s, pl.cdiv(S, rows) * rows)
        num_blocks = pl.cdiv(S, block_s)
        parallel = B * (K // hb)
        num_partitions = max(1, min(num_blocks, pl.cdiv(_TARGET_PROGRAMS, parallel)))
        return cls(block_s=block_s, num_partitions=num_partitions, kv_heads_per_block=hb)


def _block_range(bounds_ref, b, block_s):
    """First kv block holding visible keys of sequence ``b``, and how many (0 when none)."""
    start, end = bounds_ref[2 * b], bounds_ref[2 * b + 1]
    # lax.div truncates, equal to floor division here (operands >= 0) and cheaper on Mosaic.
    lo = jax.lax.div(start, block_s)
    n = jnp.where(end > start, jax.lax.div(end + block_s - 1, block_s) - lo, 0)
    return lo, n


def _kv_block(bounds_ref, b, p, i, *, block_s, num_partitions, num_blocks):
    """The kv block step ``i`` of partition ``p`` reads, and whether it is computed.

    Partition ``p`` owns blocks ``lo + p * per + [0, per)`` of the ``n`` visible ones, with
    ``per = ceil(n / P)``. Steps past a partition's share repeat its last block (and steps of an
    empty partition the sequence's last block), so the pipeline fetches nothing new for them.
    """
    lo, n = _block_range(bounds_ref, b, block_s)
    per = jax.lax.div(n + num_partitions - 1, num_partitions)
    j = lo + p * per + jnp.minimum(i, per - 1)
    j = jnp.clip(jnp.minimum(j, lo + n - 1), 0, num_blocks - 1)
    valid = (i < per) & (p * per + i < n)
    return j, valid


def _dot(a, b, contract, precision):
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _decode_kernel(
    bounds_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    block_s,
    num_partitions,
    num_blocks,
    scale,
    softcap,
    precision,
    quantized,
):
    # quantized: int8 K/V tiles plus a one-hot [R, K] row -> kv-head map and [block_s, K] scales.
    sel_ref, ks_ref, vs_ref, m_ref, l_ref, o_ref = refs if quantized else (None,) * 3 + refs
    b, p, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    j, valid = _kv_block(
        bounds_ref, b, p, i, block_s=block_s, num_partitions=num_partitions, num_blocks=num_blocks
    )

    @pl.when(valid)
    def _compute():
        start, end = bounds_ref[2 * b], bounds_ref[2 * b + 1]
        pos_1S = j * block_s + jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        visible_1S = (pos_1S >= start) & (pos_1S < end)
        pos_S1 = j * block_s + jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        visible_S1 = (pos_S1 >= start) & (pos_S1 < end)
        q_RL, k_SL, v_SL = q_ref[...], k_ref[...], v_ref[...]
        # Zero invisible V rows: 0 * NaN padding would otherwise poison the matmul.
        v_SL = jnp.where(visible_S1, v_SL, jnp.zeros_like(v_SL))
        s_RS = _dot(q_RL, k_SL.astype(q_RL.dtype), ((1,), (1,)), precision) * scale
        if quantized:
            # Per-row scales by a one-hot matmul: no dynamic lane gather in the kernel.
            hi = jax.lax.Precision.HIGHEST
            sel_RK = sel_ref[...]
            s_RS = s_RS * _dot(sel_RK, ks_ref[...], ((1,), (1,)), hi)
            vs_SK = jnp.where(visible_S1, vs_ref[...], 0.0)
            vs_RS = _dot(sel_RK, vs_SK, ((1,), (1,)), hi)
        if softcap is not None:
            s_RS = softcap * jnp.tanh(s_RS / softcap)
        s_RS = jnp.where(visible_1S, s_RS, -jnp.inf)

        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s_RS, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)  # a valid block has a visible key: m_new is finite
        p_RS = jnp.exp(s_RS - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_RS, axis=1, keepdims=True)
        if quantized:
            p_RS = p_RS * vs_RS
        pv_RL = _dot(p_RS.astype(q_RL.dtype), v_SL.astype(q_RL.dtype), ((1,), (0,)), precision)
        o_ref[...] = alpha * o_ref[...] + pv_RL
        m_ref[...] = m_new


def visible_bounds(lengths_B, S, sliding_window):
    """Interleaved ``[start_0, end_0, start_1, ...]``: visible keys are ``start <= s < end``."""
    lengths_B = lengths_B.astype(jnp.int32)
    end_B = jnp.clip(lengths_B, 0, S)
    if sliding_window is None:
        start_B = jnp.zeros_like(end_B)
    else:
        start_B = jnp.clip(lengths_B - sliding_window, 0, S)
    return jnp.stack([start_B, end_B], axis=1).reshape(-1)


def combine_partitions(m_BCPR, l_BCPR, o_BCPRL):
    """Merges per-partition (max, sum, unnormalised output) in float32; empty rows -> 0."""
    m_BCR = jnp.max(m_BCPR, axis=2)
    m_BCR = jnp.where(jnp.isfinite(m_BCR), m_BCR, 0.0)
    w_BCPR = jnp.exp(m_BCPR - m_BCR[:, :, None])  # exp(-inf) = 0 for empty partitions
    l_BCR = jnp.sum(w_BCPR * l_BCPR, axis=2)
    o_BCRL = jnp.sum(w_BCPR[..., None] * o_BCPRL, axis=2)
    return o_BCRL / jnp.where(l_BCR > 0, l_BCR, 1.0)[..., None]


_STATIC = ("sliding_window", "softcap", "scale", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
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
    interpret: bool | pltpu.InterpretParams = False,
):
    """One new query per sequence against a ``[B, S, K, H]`` KV cache (Pallas TPU).

    Args:
      q_BNH: the query of the token at position ``lengths[b] - 1``; ``N % K == 0``.
      k_BSKH, v_BSKH: the cache; its first ``lengths[b]`` positions are valid and include the
        new token's own key and value. Same dtype; positions past ``lengths`` may hold anything.
      lengths_B: int ``[B]`` valid cache positions per sequence.
      sliding_window: ``w`` restricts the query at ``p`` to keys at positions ``> p - w``.
      softcap: ``c`` applies ``c * tanh(logits / c)`` before the softmax.
      scale: logit scale, default ``H ** -0.5``.
      block_sizes: a ``DecodeBlockSizes``; default ``DecodeBlockSizes.default(...)``.
      interpret: ``True`` (or a ``pltpu.InterpretParams``) runs the kernel in TPU interpret mode.

    Returns:
      ``[B, N, H]`` in the dtype of ``q``; zeros for a sequence with no visible key.
    """
    if not jnp.issubdtype(k_BSKH.dtype, jnp.floating):
        raise ValueError(f"k must be a float array, got {k_BSKH.dtype}; see decode_attention_int8")
    return _decode(
        q_BNH, k_BSKH, v_BSKH, None, None, lengths_B, sliding_window, softcap, scale,
        block_sizes, interpret,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention_int8(
    q_BNH,
    k_BSKH,
    v_BSKH,
    k_scale_BSK,
    v_scale_BSK,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
):
    """``decode_attention`` over an int8 cache with one float scale per token and kv head.

    The cache holds ``k = k_BSKH * k_scale_BSK[..., None]`` (likewise ``v``); it is read as int8
    and dequantised in VMEM, the matmuls run in the dtype of ``q``. ``block_s`` must be a
    multiple of 32 (int8 sublane packing). Other arguments as in ``decode_attention``.
    """
    if k_BSKH.dtype != jnp.int8:
        raise ValueError(f"k must be int8, got {k_BSKH.dtype}")
    want = k_BSKH.shape[:3]
    if k_scale_BSK.shape != want or v_scale_BSK.shape != want:
        raise ValueError(
            f"scales must be [B, S, K] = {want}, got {k_scale_BSK.shape} and {v_scale_BSK.shape}"
        )
    return _decode(
        q_BNH, k_BSKH, v_BSKH, k_scale_BSK.astype(jnp.float32), v_scale_BSK.astype(jnp.float32),
        lengths_B, sliding_window, softcap, scale, block_sizes, interpret,
    )  # fmt: skip


def _decode(q_BNH, k_BSKH, v_BSKH, ks_BSK, vs_BSK, lengths_B, sliding_window, softcap, scale,
            block_sizes, interpret):  # fmt: skip
    checks.check_decode(q_BNH, k_BSKH, v_BSKH, lengths_B)
    B, N, H = q_BNH.shape
    _, S, K, _ = k_BSKH.shape
    if block_sizes is None:
        block_sizes = DecodeBlockSizes.default(B=B, S=S, K=K, H=H, dtype=k_BSKH.dtype)
    block_sizes.check(K=K, H=H, dtype=k_BSKH.dtype)
    if scale is None:
        scale = H**-0.5
    if interpret is True:
        interpret = pltpu.InterpretParams()

    quantized = ks_BSK is not None
    dtype = q_BNH.dtype if quantized else k_BSKH.dtype  # of the MXU inputs
    G, hb = N // K, block_sizes.kv_heads_per_block
    C, R, L = K // hb, hb * G, hb * H  # kv-head blocks, query rows and lanes per program
    block_s, P = block_sizes.block_s, block_sizes.num_partitions
    num_blocks = pl.cdiv(S, block_s)
    steps = pl.cdiv(num_blocks, P)

    # Block-diagonal queries: row (h, g) holds q[k = c * hb + h, g] in lanes h * H : (h + 1) * H.
    q_BChGH = q_BNH.reshape(B, C, hb, G, H).astype(dtype)
    eye_hh = jnp.eye(hb, dtype=dtype)
    q_BCRL = (q_BChGH[:, :, :, :, None, :] * eye_hh[:, None, :, None]).reshape(B, C, R, L)
    k_BSL = k_BSKH.reshape(B, S, K * H)  # free: contiguous
    v_BSL = v_BSKH.reshape(B, S, K * H)
    bounds = visible_bounds(lengths_B, S, sliding_window)

    kv_block = functools.partial(
        _kv_block, block_s=block_s, num_partitions=P, num_blocks=num_blocks
    )

    def kv_map(b, c, p, i, bounds_ref):
        return b, kv_block(bounds_ref, b, p, i)[0], c

    sq = pl.squeezed
    kv_spec = pl.BlockSpec((sq, block_s, L), kv_map)
    in_specs = [pl.BlockSpec((sq, sq, R, L), lambda b, c, p, i, _: (b, c, 0, 0)), kv_spec, kv_spec]
    operands = [bounds, q_BCRL, k_BSL, v_BSL]
    if quantized:
        # Row r of kv-head block c reads kv head c * hb + r // G; scale tiles span all K heads
        # (a block's last dim must be 128-aligned or whole), the one-hot matmul picks them.
        head_CR = jnp.arange(C * R, dtype=jnp.int32).reshape(C, R) // G
        sel_CRK = jax.nn.one_hot(head_CR, K, dtype=jnp.float32)
        scale_spec = pl.BlockSpec(
            (sq, block_s, K), lambda b, c, p, i, r: (b, kv_map(b, c, p, i, r)[1], 0)
        )
        in_specs += [
            pl.BlockSpec((sq, R, K), lambda b, c, p, i, _: (c, 0, 0)),
            scale_spec,
            scale_spec,
        ]
        operands += [sel_CRK, ks_BSK, vs_BSK]
    stat_spec = pl.BlockSpec((sq, sq, sq, R, 1), lambda b, c, p, i, _: (b, c, p, 0, 0))
    kernel = functools.partial(
        _decode_kernel,
        block_s=block_s,
        num_partitions=P,
        num_blocks=num_blocks,
        scale=scale,
        softcap=softcap,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
        quantized=quantized,
    )
    max_BCPR1, sum_BCPR1, o_BCPRL = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, C, P, steps),
            in_specs=in_specs,
            out_specs=[
                stat_spec,
                stat_spec,
                pl.BlockSpec((sq, sq, sq, R, L), lambda b, c, p, i, _: (b, c, p, 0, 0)),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((B, C, P, R, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, C, P, R, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, C, P, R, L), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="decode_attention",
    )(*operands)

    o_BCRL = combine_partitions(max_BCPR1[..., 0], sum_BCPR1[..., 0], o_BCPRL)
    o_BChGhH = o_BCRL.reshape(B, C, hb, G, hb, H)
    o_BCGHh = jnp.diagonal(o_BChGhH, axis1=2, axis2=4)  # keep head h's own lanes
    return jnp.moveaxis(o_BCGHh, -1, 2).reshape(B, N, H).astype(q_BNH.dtype)
