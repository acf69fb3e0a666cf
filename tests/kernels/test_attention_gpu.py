"""Pallas Mosaic GPU flash attention (forward) in GPU interpret mode against the jnp reference.

Interpret mode swaps the kernel's two wgmmas for float32 ``dot_general``s (its wgmma rule takes
neither transposed SMEM refs nor register operands), so these tests check the TMA pipeline,
tile skipping, masking and online softmax; the wgmma path itself is only cross-lowered for CUDA.
Tiny shapes; ``T`` and ``S`` are off the 64-row block grid.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention as attn
from kernels.attention import gpu
from tests.helpers import TOLERANCE


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    return q, k, v


B64 = gpu.BlockSizes(block_q=64, block_kv=64, num_stages=2)
CASES = {
    # name: (T, S, N, K, H, dtype, causal, window, lengths, softcap, block_sizes); B = 2 with
    # lengths, else 1.
    "mha_causal_h64": (70, 70, 2, 2, 64, jnp.float32, True, None, None, None, B64),
    "mha_noncausal_h128": (50, 90, 2, 2, 128, jnp.float32, False, None, None, None, B64),
    "gqa_lengths_empty_row": (37, 150, 4, 2, 64, jnp.float32, True, None, (150, 0), None, B64),
    "mqa_window_3stages": (
        130,
        130,
        4,
        1,
        64,
        jnp.float32,
        True,
        40,
        None,
        None,
        gpu.BlockSizes(64, 64, 3),
    ),
    "cross_softcap_lengths": (5, 200, 4, 2, 128, jnp.float32, True, None, (200, 77), 5.0, B64),
    "noncausal_window_bkv128": (
        60,
        140,
        2,
        1,
        64,
        jnp.float32,
        False,
        30,
        None,
        None,
        gpu.BlockSizes(64, 128, 2),
    ),
    "gqa_bf16_h128_window_softcap": (
        100,
        100,
        4,
        2,
        128,
        jnp.bfloat16,
        True,
        33,
        (100, 61),
        3.0,
        B64,
    ),
    "mqa_bf16_h64_default_blocks": (70, 190, 2, 1, 64, jnp.bfloat16, True, None, None, None, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    T, S, N, K, H, dtype, causal, window, lengths, softcap, sizes = CASES[name]
    B = 1 if lengths is None else len(lengths)
    q, k, v = _inputs(B, T, S, N, K, H, dtype)
    opts = dict(causal=causal, sliding_window=window, softcap=softcap)
    if lengths is not None:
        opts["lengths"] = jnp.asarray(lengths, jnp.int32)
    out = gpu.flash_attention(q, k, v, **opts, block_sizes=sizes, interpret=True)
    ref = attn.attention(q, k, v, **opts, impl="reference")
    assert out.shape == (B, T, N, H) and out.dtype == dtype
    tol = TOLERANCE[jnp.dtype(dtype).name]
    f32 = lambda a: np.asarray(a, np.float32)
    np.testing.assert_allclose(f32(out), f32(ref), atol=tol, rtol=tol)
    if lengths is not None and 0 in lengths:
        assert not np.any(f32(out)[lengths.index(0)])


def test_grad_raises():
    q, k, v = _inputs(1, 8, 8, 2, 2, 64, jnp.float32)
    loss = lambda q: gpu.flash_attention(q, k, v, interpret=True).sum()
    with pytest.raises(ValueError, match="backward not implemented"):
        jax.grad(loss)(q)


def test_errors():
    q, k, v = _inputs(1, 8, 8, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="N % K"):
        gpu.flash_attention(q, k, v, interpret=True)
    q, k, v = _inputs(1, 8, 8, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gpu.flash_attention(q, k, v)  # float32 only in interpret mode
    q, k, v = _inputs(1, 8, 8, 2, 2, 32, jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        gpu.flash_attention(q, k, v)
    for kwargs in (dict(block_q=32), dict(block_kv=512), dict(num_stages=0)):
        with pytest.raises(ValueError):
            gpu.BlockSizes(**kwargs)


@pytest.mark.parametrize(
    "B, T, S, N, K, H, dtype, causal, window, softcap",
    [
        (2, 300, 1000, 8, 2, 128, jnp.bfloat16, True, None, None),
        (1, 1000, 1000, 8, 8, 64, jnp.bfloat16, True, 128, 30.0),
        (2, 200, 200, 4, 1, 128, jnp.float16, False, None, None),
    ],
)
def test_lowers_to_mosaic_gpu(B, T, S, N, K, H, dtype, causal, window, softcap):
    """Cross-lowering for CUDA on CPU runs the Pallas->Mosaic GPU rules (wgmma, layouts, TMA)."""
    spec = jax.ShapeDtypeStruct
    kv = spec((B, S, K, H), dtype)
    fn = functools.partial(
        gpu.flash_attention, causal=causal, sliding_window=window, softcap=softcap
    )
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(spec((B, T, N, H), dtype), kv, kv)
    assert "mosaic_gpu" in exported.mlir_module()
