"""Backward of the Pallas Mosaic GPU (Hopper) flash attention (``gpu.py``): a dq and a dk/dv kernel.

With ``P = exp(s - lse)`` rebuilt from the forward's log-sum-exp and ``delta = rowsum(dO * O)``
(Dao 2023, arXiv:2307.08691, Algorithm 2): ``dV = P^T dO``, ``dP = dO V^T``,
``dS = P * (dP - delta)`` (times ``1 - tanh^2`` with a softcap), ``dQ = scale * dS K``,
``dK = scale * dS^T Q``. Every matmul is a warpgroup MMA (``plgpu.wgmma``) with float32
accumulation; a register operand (``P``, ``dS``) is cast to the input dtype first.

- dq: grid ``(B, N, ceil(T / block_q))`` as the forward. A program holds its ``[block_q, H]``
  Q and dO tiles in SMEM and its lse / delta rows in registers, and streams the K/V tiles of
  kv head ``n // G`` over the range of tiles with a visible key (``tpu.kv_block_ranges``).
- dk/dv: grid ``(B, K, ceil(S / block_kv))``. A program holds one K and one V tile in SMEM and
  streams Q, dO tiles and lse, delta rows of each of the ``G`` query heads of its group over
  the query blocks that see the tile (``tpu.q_block_ranges``): a pipeline grid of
  ``(G, count)``. It computes ``S^T = K Q^T`` (``[block_kv, block_q]``) directly, so ``P^T``
  and ``dS^T`` are the register A operands of ``dV += P^T dO`` and ``dK += dS^T Q`` with no
  transposes; dK and dV are float32 carries, written once through the K/V SMEM tiles.

Masked tiles are never fetched; only tiles that straddle a mask boundary pay for the
per-element mask (``gpu.SKIP_INTERIOR_MASKS``). ``T`` is padded up to ``block_q`` (q, dO,
lse, delta) and dK/dV are written to ``S`` padded up to ``block_kv`` (a TMA store past the end
of an array is clipped on the GPU but an error in interpret mode), then sliced back. Interpret
mode runs the wgmmas as float32 ``dot_general``s (``gpu._matmul``) and skips the layout casts
and layout-annotated loads. Example::

    dq, dk, dv = backward(q, k, v, kv_len_B, out, lse_BNT, do, cfg)  # cfg: gpu._Config
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import gpu
from kernels.attention.tpu import kv_block_ranges, q_block_ranges


@dataclasses.dataclass(frozen=True)
class BwdBlockSizes:
    """Tiling of the GPU flash-attention backward (both kernels).

    Attributes:
      block_q: query rows per tile; a multiple of 64 (the rows of one wgmma), at most 256.
      block_kv: keys per tile; a multiple of 64, at most 256 (one TMA box). The dk/dv kernel
        keeps two ``[block_kv, H]`` float32 accumulators in the registers of one warpgroup.
      num_stages: SMEM buffers of each kernel's TMA pipeline (copies in flight).
    """

    block_q: int = 64
    block_kv: int = 64
    num_stages: int = 2

    def __post_init__(self):
        top = gpu._MAX_TMA_BOX
        for name in ("block_q", "block_kv"):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % 64 or b > top:
                raise ValueError(
                    f"{name} must be a positive multiple of 64 and <= {top}, got {b!r}"
                )
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")

    @classmethod
    def for_shape(cls, S: int, H: int) -> BwdBlockSizes:
        """64-row query tiles; 64-key tiles, 128 for ``H <= 64``: the dK and dV accumulators
        take ``2 * block_kv * H / 128`` float32 registers per thread of the warpgroup. Capped
        by ``S`` rounded up to 64."""
        block_kv = min(128 if H <= 64 else 64, -(-S // 64) * 64)
        return cls(block_q=64, block_kv=block_kv, num_stages=2)


def _smem_bytes(bs: BwdBlockSizes, H: int, dtype) -> int:
    """The larger SMEM of the two programs: two resident ``[rows, H]`` tiles (Q, dO or K, V)
    and ``num_stages`` buffers of the two streamed tiles (and the lse / delta rows), plus
    ~3 KiB of barriers and alignment as in ``gpu._smem_bytes``."""
    itemsize = jnp.dtype(dtype).itemsize
    dq = (2 * bs.block_q + 2 * bs.num_stages * bs.block_kv) * H * itemsize + 8 * bs.block_q
    dkv = (2 * bs.block_kv + 2 * bs.num_stages * bs.block_q) * H * itemsize
    dkv += 8 * bs.num_stages * bs.block_q
    return max(dq, dkv) + 3 * 1024


def _mma_acc(acc, a, b_smem, interpreting: bool):
    """``acc + a @ b`` in float32 (``a`` registers in the input dtype); in place on GPU."""
    if interpreting:
        return acc + gpu._matmul(a, b_smem, transpose_b=False, interpreting=True)

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)

    return pl.run_state(mma)(plgpu.ACC.init(acc))


def _dv_and_dpt(dv, p_t, v_smem, do_smem, interpreting: bool):
    """``(dv + P^T dO, V dO^T)``; on GPU both wgmmas are issued before one wait."""
    if interpreting:
        return _mma_acc(dv, p_t, do_smem, True), gpu._matmul(
            v_smem, do_smem, transpose_b=True, interpreting=True
        )

    def mma(refs):
        dv_ref, dpt_ref = refs
        plgpu.wgmma(dv_ref, p_t, do_smem)
        plgpu.wgmma(dpt_ref, v_smem, plgpu.transpose_ref(do_smem, (1, 0)))

    zeros = plgpu.layout_cast(jnp.zeros(p_t.shape, jnp.float32), plgpu.Layout.WGMMA)
    return pl.run_state(mma)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))


def _probs(x, lse2_row, query_dim: int, mask, cfg: gpu._Config):
    """``P`` of a tile from the raw dot products ``x`` and the base-2 lse of its queries (along
    ``query_dim``), and ``tanh(scale * x / c)`` with a softcap (else ``None``)."""
    lse2 = jax.lax.broadcast_in_dim(lse2_row, x.shape, (query_dim,))
    if cfg.softcap is None:
        th = None
        p = jnp.exp2(x * (cfg.scale * gpu.LOG2E) - lse2)
    else:
        th = jnp.tanh(x * (cfg.scale / cfg.softcap))
        p = jnp.exp2(th * (cfg.softcap * gpu.LOG2E) - lse2)
    return (p if mask is None else jnp.where(mask, p, 0.0)), th


def _dlogits(p, th, dp, delta_row, query_dim: int):
    """``dS`` w.r.t. ``scale * q.k``: ``P * (dP - delta)``, times ``1 - tanh^2`` when capped."""
    ds = p * (dp - jax.lax.broadcast_in_dim(delta_row, p.shape, (query_dim,)))
    return ds if th is None else ds * (1.0 - th * th)


def _masked_if(partial, step, mask_fn, carry):
    """``step(carry, mask)``, with the mask only when the scalar ``partial`` says the tile has
    invisible keys (a ``lax.cond``), as ``gpu.attend_tile_masked_if``."""
    if not gpu.SKIP_INTERIOR_MASKS:
        return step(carry, mask_fn())
    return jax.lax.cond(partial, lambda c: step(c, mask_fn()), lambda c: step(c, None), carry)


def _load_row(ref, layout, interpreting: bool):
    """A float32 row (lse, delta) from SMEM in the given register layout."""
    return ref[...] if interpreting else plgpu.load(ref, (), layout=layout)


def _dq_kernel(
    meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
    cfg: gpu._Config, bs: BwdBlockSizes, G: int, num_q: int,
):  # fmt: skip
    interpreting = cfg.interpret
    _cast = (lambda x, layout: x) if interpreting else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    b, n, i, kh = gpu._program(G)
    bq, bk, H = bs.block_q, bs.block_kv, q_ref.shape[3]
    first, count, kv_len, q_off = gpu._meta(meta_ref, b * num_q + i)
    q_rows = pl.ds(i * bq, bq)
    q_first = q_off + i * bq

    def scoped(q_smem, do_smem, lse_smem, delta_smem, barrier):
        plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, n], q_smem, barrier.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[b, q_rows, n], do_smem, barrier.at[0])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, n, q_rows], lse_smem, barrier.at[0])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, n, q_rows], delta_smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        # Rows, not [bq, bk] tiles, stay live across the loop (registers).
        lse2 = _load_row(lse_smem, L.reduce(1), interpreting)
        delta = _load_row(delta_smem, L.reduce(1), interpreting)
        iota = lambda dim: _cast(jax.lax.broadcasted_iota(jnp.int32, (bq, bk), dim), L)

        def body(indices, k_smem, v_smem, dq):
            (j,) = indices
            k_first = (first + j) * bk

            def step(dq, mask):
                x = gpu._matmul(q_smem, k_smem, transpose_b=True, interpreting=interpreting)
                p, th = _probs(x, lse2, 0, mask, cfg)
                dp = gpu._matmul(do_smem, v_smem, transpose_b=True, interpreting=interpreting)
                ds = _dlogits(p, th, dp, delta, 0)
                return _mma_acc(dq, ds.astype(k_smem.dtype), k_smem, interpreting)

            return _masked_if(
                gpu._tile_is_partial(cfg, q_first, q_first + bq - 1, k_first, bk, kv_len),
                step,
                lambda: gpu._tile_mask(cfg, q_first + iota(0), k_first + iota(1), kv_len),
                dq,
            )

        spec = plgpu.BlockSpec(
            (bk, H), lambda j: (first + j, 0), transforms=gpu.smem_transforms(H, k_ref.dtype)
        )
        dq = plgpu.emit_pipeline(
            body,
            grid=(count,),
            in_specs=[spec, spec],
            max_concurrent_steps=bs.num_stages,
            init_carry=_cast(jnp.zeros((bq, H), jnp.float32), L),
        )(k_ref.at[b, :, kh, :], v_ref.at[b, :, kh, :])
        q_smem[...] = (dq * cfg.scale).astype(q_smem.dtype)  # Q is no longer read
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, q_rows, n])
        plgpu.wait_smem_to_gmem(0)

    tile = plgpu.SMEM((bq, H), q_ref.dtype, transforms=gpu.smem_transforms(H, q_ref.dtype))
    pl.run_scoped(
        scoped,
        tile,
        tile,
        plgpu.SMEM((bq,), jnp.float32),
        plgpu.SMEM((bq,), jnp.float32),
        plgpu.Barrier(num_arrivals=4, num_barriers=1),
    )


def _dkv_kernel(
    meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
    cfg: gpu._Config, bs: BwdBlockSizes, G: int, num_kv: int,
):  # fmt: skip
    interpreting = cfg.interpret
    _cast = (lambda x, layout: x) if interpreting else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    b, kh, j = (jax.lax.axis_index(a) for a in ("b", "k", "kv"))
    bq, bk, H = bs.block_q, bs.block_kv, k_ref.shape[3]
    first, count, kv_len, q_off = gpu._meta(meta_ref, b * num_kv + j)
    kv_rows = pl.ds(j * bk, bk)

    def scoped(k_smem, v_smem, barrier):
        plgpu.copy_gmem_to_smem(k_ref.at[b, kv_rows, kh], k_smem, barrier.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[b, kv_rows, kh], v_smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        # Tiles are transposed: keys along rows, queries along columns.
        iota = lambda dim: _cast(jax.lax.broadcasted_iota(jnp.int32, (bk, bq), dim), L)

        def body(indices, q_smem, do_smem, lse_smem, delta_smem, carry):
            _, i = indices
            q_first = q_off + (first + i) * bq
            lse2 = _load_row(lse_smem, L.reduce(0), interpreting)
            delta = _load_row(delta_smem, L.reduce(0), interpreting)

            def step(carry, mask):
                dk, dv = carry
                x_t = gpu._matmul(k_smem, q_smem, transpose_b=True, interpreting=interpreting)
                p_t, th = _probs(x_t, lse2, 1, mask, cfg)
                dv, dp_t = _dv_and_dpt(dv, p_t.astype(q_smem.dtype), v_smem, do_smem, interpreting)
                ds_t = _dlogits(p_t, th, dp_t, delta, 1)
                return _mma_acc(dk, ds_t.astype(q_smem.dtype), q_smem, interpreting), dv

            return _masked_if(
                gpu._tile_is_partial(cfg, q_first, q_first + bq - 1, j * bk, bk, kv_len),
                step,
                lambda: gpu._tile_mask(cfg, q_first + iota(1), j * bk + iota(0), kv_len),
                carry,
            )

        transforms = gpu.smem_transforms(H, q_ref.dtype)
        tile_map = lambda g, i: (first + i, kh * G + g, 0)
        tile = plgpu.BlockSpec((bq, pl.Squeezed(), H), tile_map, transforms=transforms)
        row = plgpu.BlockSpec((pl.Squeezed(), bq), lambda g, i: (kh * G + g, first + i))
        zeros = _cast(jnp.zeros((bk, H), jnp.float32), L)
        dk, dv = plgpu.emit_pipeline(
            body,
            grid=(G, count),
            in_specs=[tile, tile, row, row],
            max_concurrent_steps=bs.num_stages,
            init_carry=(zeros, zeros),
        )(q_ref.at[b], do_ref.at[b], lse_ref.at[b], delta_ref.at[b])
        k_smem[...] = (dk * cfg.scale).astype(k_smem.dtype)  # K and V are no longer read
        v_smem[...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, kv_rows, kh])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, kv_rows, kh])
        plgpu.wait_smem_to_gmem(0)

    tile = plgpu.SMEM((bk, H), k_ref.dtype, transforms=gpu.smem_transforms(H, k_ref.dtype))
    pl.run_scoped(scoped, tile, tile, plgpu.Barrier(num_arrivals=2, num_barriers=1))


def _meta_table(first_BX, count_BX, kv_len_B, q_off: int):
    """Flat int32 ``(first, count, kv_len, position of query 0)`` per (sequence, block), the
    rows ``gpu._meta`` reads."""
    B, X = first_BX.shape
    per_b = [jnp.broadcast_to(kv_len_B[:, None], (B, X)), jnp.full((B, X), q_off, jnp.int32)]
    return jnp.stack([first_BX, count_BX, *per_b], -1).reshape(-1).astype(jnp.int32)


def backward(
    q_BTNH, k_BSKH, v_BSKH, kv_len_B, out_BTNH, lse_BNT, do_BTNH, cfg: gpu._Config,
    block_sizes: BwdBlockSizes | None = None,
):  # fmt: skip
    """Gradients of ``gpu.flash_attention`` w.r.t. ``q``, ``k``, ``v``.

    Args:
      q_BTNH, k_BSKH, v_BSKH: the forward's inputs; query ``t`` at position ``S - T + t``.
      kv_len_B: int32 ``[B]`` valid keys per sequence (clipped to ``[0, S]``).
      out_BTNH: the forward's output.
      lse_BNT: float32 ``[B, N, T]`` natural log-sum-exp of the visible logits per query; any
        value for a query with no visible key.
      do_BTNH: the output cotangent.
      cfg: the forward's ``gpu._Config`` (its ``block_sizes`` are not used).
      block_sizes: ``BwdBlockSizes``; default ``BwdBlockSizes.for_shape``, with fewer stages
        if needed to fit the SMEM.

    Returns:
      ``(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H])`` in the input dtypes; keys no
      query sees get zeros.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    bs = BwdBlockSizes.for_shape(S, H) if block_sizes is None else block_sizes
    while bs.num_stages > 1 and _smem_bytes(bs, H, q_BTNH.dtype) > gpu._SMEM_LIMIT:
        bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
    bq, bk = bs.block_q, bs.block_kv
    f32 = lambda x: x.astype(jnp.float32)
    delta_BNT = jnp.einsum("btnh,btnh->bnt", f32(do_BTNH), f32(out_BTNH))
    # Base-2 lse; padding rows and non-finite values (rows with no visible key) become a large
    # finite number, so that their P is exp2(s - 1e30) = 0 even where no mask is applied.
    lse2_BNT = jnp.where(jnp.isfinite(lse_BNT), f32(lse_BNT) * gpu.LOG2E, -gpu.MASK_VALUE)
    num_q = -(-T // bq)
    pad_t = num_q * bq - T
    rows = lambda x, v: jnp.pad(x, ((0, 0), (0, 0), (0, pad_t)), constant_values=v)
    lse2_BNT, delta_BNT = rows(lse2_BNT, -gpu.MASK_VALUE), rows(delta_BNT, 0.0)
    tpad = ((0, 0), (0, pad_t), (0, 0), (0, 0))
    q, do = jnp.pad(q_BTNH, tpad), jnp.pad(do_BTNH.astype(q_BTNH.dtype), tpad)
    k, v = gpu.pad_keys(k_BSKH, v_BSKH)
    mask_kw = dict(T=T, S=S, block_q=bq, block_kv=bk, causal=cfg.causal)
    mask_kw["sliding_window"] = cfg.sliding_window
    interpret = gpu._interpret_params() if cfg.interpret else None
    args = (q, k, v, do, lse2_BNT, delta_BNT)

    first, count = kv_block_ranges(kv_len_B, **mask_kw)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, cfg=cfg, bs=bs, G=G, num_q=num_q),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, N, num_q),
        grid_names=("b", "n", "q"),
        interpret=interpret,
    )(_meta_table(first, count, kv_len_B, S - T), *args)

    first, count = q_block_ranges(kv_len_B, **mask_kw)
    num_kv = first.shape[1]
    dkv_type = jax.ShapeDtypeStruct((B, num_kv * bk, K, H), k.dtype)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, cfg=cfg, bs=bs, G=G, num_kv=num_kv),
        out_type=(dkv_type, dkv_type),
        grid=(B, K, num_kv),
        grid_names=("b", "k", "kv"),
        interpret=interpret,
    )(_meta_table(first, count, kv_len_B, S - T), *args)
    return dq[:, :T], dk[:, :S], dv[:, :S]
