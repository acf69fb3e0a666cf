"""Pallas Mosaic GPU flash attention backward (``gpu_bwd.py``) in GPU interpret mode.

dq, dk, dv against ``jax.vjp`` of the jnp reference, with the log-sum-exp the kernels take
computed here from the reference logits. Interpret mode swaps the wgmmas for float32
``dot_general``s (``gpu._matmul``), so these check the TMA pipelines, tile skipping, masking
and the gradient math; the wgmma path itself is cross-lowered for CUDA. Tiny shapes, ``T`` and
``S`` off the 64-row block grid.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention as attn
from kernels.attention import gpu, gpu_bwd, reference
from tests.helpers import TOLERANCE


def _lse(q_BTNH, k_BSKH, kv_len_B, *, causal, window, softcap):
    """Natural log-sum-exp ``[B, N, T]`` of the visible reference logits (``-inf`` if none)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH.astype(jnp.float32)) * H**-0.5
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    q_pos_BT = jnp.broadcast_to(S - T + jnp.arange(T), (B, T))
    mask = reference.key_mask(q_pos_BT, kv_len_B, S, causal=causal, sliding_window=window)
    lse = jax.nn.logsumexp(jnp.where(mask[:, None, None], logits, -jnp.inf), axis=-1)
    return lse.reshape(B, N, T)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _reference(q, k, v, kv_len, do, causal, window, softcap):
    """Output, ``(dq, dk, dv)`` and lse of the jnp reference (jitted: eager is slow)."""
    opts = dict(causal=causal, sliding_window=window, softcap=softcap, lengths=kv_len)
    out, vjp = jax.vjp(lambda q, k, v: attn.attention(q, k, v, **opts, impl="reference"), q, k, v)
    lse = _lse(q, k, kv_len, causal=causal, window=window, softcap=softcap)
    return out, vjp(do), lse


@functools.partial(jax.jit, static_argnames=("cfg", "block_sizes"))
def _backward(q, k, v, kv_len, out, lse, do, cfg, block_sizes):
    return gpu_bwd.backward(q, k, v, kv_len, out, lse, do, cfg, block_sizes)


B64 = gpu_bwd.BwdBlockSizes(block_q=64, block_kv=64, num_stages=2)
CASES = {
    # name: (T, S, N, K, H, dtype, causal, window, lengths, softcap, block_sizes); B = 2 with
    # lengths, else 1.
    "mha_causal_h64": (70, 70, 2, 2, 64, jnp.float32, True, None, None, None, B64),
    "gqa_noncausal_lengths_empty_row_bkv128": (
        37, 150, 4, 2, 64, jnp.float32, False, None, (150, 0), None,
        gpu_bwd.BwdBlockSizes(64, 128, 3),
    ),
    "mqa_causal_window_h128": (70, 130, 2, 1, 128, jnp.float32, True, 40, None, None, B64),
    "gqa_causal_softcap_lengths_h128": (
        37, 150, 4, 2, 128, jnp.float32, True, None, (150, 77), 5.0, B64,
    ),
    "mha_noncausal_window_softcap_default_blocks": (
        70, 70, 2, 2, 64, jnp.float32, False, 30, None, 4.0, None,
    ),
    "gqa_bf16_h128_window_softcap_lengths": (
        70, 70, 4, 2, 128, jnp.bfloat16, True, 33, (70, 41), 3.0, B64,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference(name):
    T, S, N, K, H, dtype, causal, window, lengths, softcap, sizes = CASES[name]
    B = 1 if lengths is None else len(lengths)
    kq, kk, kv, ko = jax.random.split(jax.random.key(1), 4)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    q, k, v = normal(kq, (B, T, N, H)), normal(kk, (B, S, K, H)), normal(kv, (B, S, K, H))
    do = normal(ko, (B, T, N, H))
    kv_len = jnp.asarray((S,) * B if lengths is None else lengths, jnp.int32)
    out, want, lse = _reference(q, k, v, kv_len, do, causal, window, softcap)
    cfg = gpu._Config(T, S, causal, window, softcap, H**-0.5, gpu.BlockSizes(64, 64), True)
    got = _backward(q, k, v, kv_len, out, lse, do, cfg, sizes)

    tol = TOLERANCE[jnp.dtype(dtype).name]
    f32 = lambda a: np.asarray(a, np.float32)
    for name_, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype, name_
        np.testing.assert_allclose(f32(g), f32(w), atol=tol, rtol=tol, err_msg=name_)
    if lengths is not None:  # keys past a length, and all of an empty row, get exact zeros
        dq, dk, dv = map(f32, got)
        for b, n_keys in enumerate(lengths):
            assert not np.any(dk[b, n_keys:]) and not np.any(dv[b, n_keys:])
            assert n_keys or not np.any(dq[b])


def test_block_sizes():
    for kwargs in (dict(block_q=32), dict(block_kv=320), dict(block_q=100), dict(num_stages=0)):
        with pytest.raises(ValueError):
            gpu_bwd.BwdBlockSizes(**kwargs)
    f = gpu_bwd.BwdBlockSizes.for_shape
    assert f(4096, 128) == gpu_bwd.BwdBlockSizes(64, 64, 2)
    assert f(4096, 64).block_kv == 128 and f(70, 64).block_kv == 128 and f(40, 64).block_kv == 64
    for H in (64, 128, 256):
        assert gpu_bwd._smem_bytes(f(4096, H), H, jnp.bfloat16) <= gpu._SMEM_LIMIT


@pytest.mark.parametrize(
    "B, T, S, N, K, H, dtype, causal, window, softcap, block_sizes",
    [
        (2, 300, 1000, 8, 2, 128, jnp.bfloat16, True, None, None, None),  # causal GQA
        (1, 200, 1003, 4, 4, 64, jnp.bfloat16, True, 128, 30.0, None),  # S padded to 1008
        (2, 200, 200, 4, 1, 256, jnp.float16, False, None, None, None),
        # 3 stages of 256-key tiles do not fit at H = 128: the wrapper drops to 2.
        (1, 256, 512, 4, 2, 128, jnp.bfloat16, True, None, None, gpu_bwd.BwdBlockSizes(64, 256, 3)),
    ],
)
def test_lowers_to_mosaic_gpu(B, T, S, N, K, H, dtype, causal, window, softcap, block_sizes):
    """Cross-lowering for CUDA on CPU runs the Pallas->Mosaic GPU rules (wgmma operands and
    register layouts, TMA, and the 227 KiB SMEM limit)."""
    spec = jax.ShapeDtypeStruct
    q, kv = spec((B, T, N, H), dtype), spec((B, S, K, H), dtype)
    cfg = gpu._Config(T, S, causal, window, softcap, H**-0.5, gpu.BlockSizes(), False)
    fn = functools.partial(gpu_bwd.backward, cfg=cfg, block_sizes=block_sizes)
    args = (q, kv, kv, spec((B,), jnp.int32), q, spec((B, N, T), jnp.float32), q)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()
    assert [o.shape for o in exported.out_avals] == [q.shape, kv.shape, kv.shape]
