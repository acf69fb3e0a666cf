"""Backward of the Pallas TPU flash attention (``tpu.py``): a dq kernel and a dk/dv kernel.

With ``P = exp(S - lse)`` rebuilt from the forward's log-sum-exp and
``delta = rowsum(dO * O)`` (Dao 2023, arXiv:2307.08691, Algorithm 2):
``dV = P^T dO``, ``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``;
a softcap multiplies ``dS`` by ``1 - tanh^2``. The dq kernel walks kv blocks per query block
(as the forward); the dk/dv kernel walks query blocks per kv block, and because a kv head's
``G`` query heads sit in one ``[G * block_q, H]`` tile, the sum over the group is the matmul's
contraction. Both skip fully masked blocks as the forward does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import tpu


def _probs_and_dlogits(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_blk, kv_blk, kv_len, cfg):
    """``P`` and ``dS`` (w.r.t. the scaled, pre-softcap logits) of one tile, ``[G * bq, bk]``."""
    G, bq, H = q_ref.shape
    bk = k_ref.shape[0]
    s, th = tpu.logits(q_ref[...].reshape(G * bq, H), k_ref[...], cfg)
    mask = tpu.visible(q_blk, kv_blk, kv_len, cfg, bq, bk)[None]
    lse = lse_ref[...].reshape(G * bq, 1)
    p = jnp.where(mask, jnp.exp(s - lse).reshape(G, bq, bk), 0.0).reshape(G * bq, bk)
    dp = jax.lax.dot_general(
        do_ref[...].reshape(G * bq, H), v_ref[...], (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    ds = p * (dp - delta_ref[...].reshape(G * bq, 1))
    if th is not None:
        ds = ds * (1.0 - th * th)
    return p, ds


def _dq_kernel(
    kv_len_ref, first_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
    dq_sc, *, cfg, num_steps,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    G, bq, H = q_ref.shape
    row = b * pl.num_programs(2) + i

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(j < count_ref[row])
    def _step():
        kv_blk = first_ref[row] + j
        _, ds = _probs_and_dlogits(
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, i, kv_blk, kv_len_ref[b], cfg
        )
        k = k_ref[...]
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == num_steps - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).reshape(G, bq, H).astype(dq_ref.dtype)


def _dkv_kernel(
    kv_len_ref, first_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
    dv_ref, dk_sc, dv_sc, *, cfg, num_steps,
):  # fmt: skip
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    G, bq, H = q_ref.shape
    row = b * pl.num_programs(2) + j
    tn = (((0,), (0,)), ((), ()))  # contract the G * bq rows: A^T B

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(i < count_ref[row])
    def _step():
        q_blk = first_ref[row] + i
        p, ds = _probs_and_dlogits(
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_blk, j, kv_len_ref[b], cfg
        )
        do = do_ref[...].reshape(G * bq, H)
        q = q_ref[...].reshape(G * bq, H)
        dv_sc[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32
        )
        dk_sc[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, tn, preferred_element_type=jnp.float32
        )

    @pl.when(i == num_steps - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _rows(x_BNT, block: int):
    """``[B, N, T]`` float32 row statistic -> ``[B, N, T_padded, 1]``."""
    pad = tpu._round_up(x_BNT.shape[2], block) - x_BNT.shape[2]
    return jnp.pad(x_BNT, ((0, 0), (0, 0), (0, pad)))[..., None]


def backward(q_BTNH, k_BSKH, v_BSKH, kv_len_B, out_BTNH, lse_BNT, do_BTNH, cfg):
    """Gradients ``(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H])``."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    bs = cfg.block_sizes
    delta_BNT = jnp.swapaxes(
        jnp.sum(do_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), axis=-1), 1, 2
    )
    do_BTNH = do_BTNH.astype(q_BTNH.dtype)
    mask_kw = dict(T=T, S=S, causal=cfg.causal, sliding_window=cfg.sliding_window)
    scratch = lambda *shape: pltpu.VMEM(shape, jnp.float32)

    # dq: grid (B, K, query blocks, kv steps), kv blocks clamped to each query block's range.
    bq, bk = bs.block_q, bs.block_kv
    first, count = tpu.kv_block_ranges(kv_len_B, block_q=bq, block_kv=bk, **mask_kw)
    steps = tpu.static_num_steps(tpu.kv_block_ranges, block_q=bq, block_kv=bk, **mask_kw)
    q, do = tpu.to_kernel_layout(q_BTNH, bq), tpu.to_kernel_layout(do_BTNH, bq)
    k, v = tpu.to_kernel_layout(k_BSKH, bk), tpu.to_kernel_layout(v_BSKH, bk)
    lse, delta = _rows(lse_BNT, bq), _rows(delta_BNT, bq)
    nq = q.shape[2] // bq

    def kv_map(b, h, i, j, kv_len, first, count):
        row = b * nq + i
        return b, h, first[row] + jnp.minimum(j, jnp.maximum(count[row] - 1, 0)), 0

    q_spec = pl.BlockSpec((pl.Squeezed(), G, bq, H), lambda b, h, i, j, *_: (b, h, i, 0))
    row_spec = pl.BlockSpec((pl.Squeezed(), G, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), bk, H), kv_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, K, nq, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[scratch(G * bq, H)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=tpu.COMPILER_PARAMS,
        interpret=tpu.interpret_arg(cfg),
        name="flash_attention_dq",
    )(kv_len_B, first.reshape(-1), count.reshape(-1), q, k, v, do, lse, delta)

    # dk, dv: grid (B, K, kv blocks, query steps), query blocks clamped to each kv block's range.
    bq, bk = bs.block_q_dkv, bs.block_kv_dkv
    first, count = tpu.q_block_ranges(kv_len_B, block_q=bq, block_kv=bk, **mask_kw)
    steps = tpu.static_num_steps(tpu.q_block_ranges, block_q=bq, block_kv=bk, **mask_kw)
    q, do = tpu.to_kernel_layout(q_BTNH, bq), tpu.to_kernel_layout(do_BTNH, bq)
    k, v = tpu.to_kernel_layout(k_BSKH, bk), tpu.to_kernel_layout(v_BSKH, bk)
    lse, delta = _rows(lse_BNT, bq), _rows(delta_BNT, bq)
    nkv = k.shape[2] // bk

    def q_map(b, h, j, i, kv_len, first, count):
        row = b * nkv + j
        return b, h, first[row] + jnp.minimum(i, jnp.maximum(count[row] - 1, 0)), 0

    q_spec = pl.BlockSpec((pl.Squeezed(), G, bq, H), q_map)
    row_spec = pl.BlockSpec((pl.Squeezed(), G, bq, 1), q_map)
    kv_spec = pl.BlockSpec(
        (pl.Squeezed(), pl.Squeezed(), bk, H), lambda b, h, j, i, *_: (b, h, j, 0)
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, num_steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, K, nkv, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[scratch(bk, H), scratch(bk, H)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=tpu.COMPILER_PARAMS,
        interpret=tpu.interpret_arg(cfg),
        name="flash_attention_dkv",
    )(kv_len_B, first.reshape(-1), count.reshape(-1), q, k, v, do, lse, delta)

    unlayout = lambda x, L: jnp.swapaxes(x[:, :, :L], 1, 2)
    return unlayout(dq, T), unlayout(dk, S), unlayout(dv, S)
