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


def test_gradients_through_the_dispatcher_match_reference():
    """jax.grad of attention(impl="pallas_gpu") runs the forward with its lse output and then
    gpu_bwd (kernel-level cases are in test_attention_gpu_bwd.py)."""
    q, k, v = _inputs(2, 70, 130, 4, 2, 64, jnp.float32, seed=5)
    lengths = jnp.asarray([130, 90], jnp.int32)
    do = jax.random.normal(jax.random.key(9), q.shape)

    def grads(impl, **kw):
        loss = lambda q, k, v: jnp.sum(
            attn.attention(q, k, v, lengths=lengths, softcap=8.0, impl=impl, **kw) * do
        )
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("pallas_gpu", interpret=True), grads("reference"), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


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


WS = gpu.BlockSizes(block_q=64, block_kv=128, num_stages=3, compute_warpgroups=2)
ONE_WG = gpu.BlockSizes(block_q=64, block_kv=64, num_stages=2)


@pytest.mark.parametrize("block_sizes", [WS, ONE_WG], ids=["warp_specialized", "one_warpgroup"])
@pytest.mark.parametrize(
    "B, T, S, N, K, H, dtype, causal, window, softcap",
    [
        (2, 300, 1000, 8, 2, 128, jnp.bfloat16, True, None, None),
        (1, 1000, 1003, 8, 8, 64, jnp.bfloat16, True, 128, 30.0),  # S padded to 1008
        (2, 200, 200, 4, 1, 128, jnp.float16, False, None, None),
    ],
)
def test_lowers_to_mosaic_gpu(B, T, S, N, K, H, dtype, causal, window, softcap, block_sizes):
    """Cross-lowering for CUDA on CPU runs the Pallas->Mosaic GPU rules (wgmma, layouts, TMA,
    and the SMEM limit: Mosaic GPU refuses a kernel over 227 KiB)."""
    spec = jax.ShapeDtypeStruct
    kv = spec((B, S, K, H), dtype)
    fn = functools.partial(
        gpu.flash_attention, causal=causal, sliding_window=window, softcap=softcap,
        block_sizes=block_sizes,
    )  # fmt: skip
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(spec((B, T, N, H), dtype), kv, kv)
    assert "mosaic_gpu" in exported.mlir_module()


def test_forward_with_lse_lowers_with_a_stage_less_when_smem_is_full():
    """Three 128-key stages and two query tiles fill the SMEM; the lse rows the backward needs
    then cost one stage (``_smem_bytes`` predicts Mosaic GPU's count)."""
    assert gpu._smem_bytes(WS, 128, jnp.bfloat16, False) <= gpu._SMEM_LIMIT
    assert gpu._smem_bytes(WS, 128, jnp.bfloat16, True) > gpu._SMEM_LIMIT
    spec = jax.ShapeDtypeStruct
    kv = spec((2, 512, 2, 128), jnp.bfloat16)
    cfg = gpu._Config(512, 512, True, None, None, 0.1, WS, False)
    fn = lambda q, k, v: gpu._forward(q, k, v, jnp.full((2,), 512, jnp.int32), cfg, True)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(
        spec((2, 512, 4, 128), jnp.bfloat16), kv, kv
    )
    assert [o.shape for o in exported.out_avals] == [(2, 512, 4, 128), (2, 4, 512)]


def test_forward_lse_matches_logsumexp():
    B, T, S, N, K, H = 2, 70, 150, 4, 2, 64
    q, k, v = _inputs(B, T, S, N, K, H, jnp.float32)
    lengths = jnp.asarray([150, 0], jnp.int32)
    for causal, softcap, window in [(True, None, None), (False, 5.0, None), (True, None, 40)]:
        cfg = gpu._Config(T, S, causal, window, softcap, H**-0.5, B64, True)
        _, lse = gpu._forward(q, k, v, lengths, cfg, with_lse=True)
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2)) * H**-0.5
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        pos_q, pos_k = S - T + jnp.arange(T)[:, None], jnp.arange(S)[None]
        mask = pos_k < lengths[:, None, None, None]
        mask &= (pos_k <= pos_q) if causal else True
        mask &= (pos_k > pos_q - window) if window else True
        ref = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
        visible = np.isfinite(np.asarray(ref))
        np.testing.assert_allclose(np.asarray(lse)[visible], np.asarray(ref)[visible], atol=1e-5)
        assert not np.any(np.asarray(lse)[~visible])  # empty rows: 0


def test_default_block_sizes():
    f = gpu.BlockSizes.for_shape
    assert f(4096, 4096, 128, jnp.bfloat16) == WS
    assert f(4096, 4096, 256, jnp.bfloat16) == ONE_WG
    assert f(100, 100, 128, jnp.bfloat16).block_kv == 128
    assert f(40, 40, 64, jnp.bfloat16).block_kv == 64
    interpreted = f(4096, 4096, 128, jnp.float32, interpret=True)
    assert interpreted.compute_warpgroups == 1
    q, k, v = _inputs(1, 8, 8, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="no interpret mode"):
        gpu.flash_attention(q, k, v, block_sizes=WS, interpret=True)


@pytest.mark.parametrize(
    "T, S, N, K, H, starts, lengths, window, softcap",
    [
        (5, 150, 4, 2, 64, (0, 37, 140), (5, 42, 145), None, None),  # chunks at ragged offsets
        (70, 200, 2, 1, 128, (130, 0, 64), (200, 70, 100), 50, 4.0),  # MQA, window, softcap
        (8, 90, 4, 4, 64, (10, 0, 80), (18, 0, 90), None, None),  # an empty cache row
    ],
)
def test_cached_attention_matches_reference(T, S, N, K, H, starts, lengths, window, softcap):
    """Multi-token chunks appended to a non-empty cache: query t of sequence b sits at
    ``starts[b] + t`` and sees the first ``lengths[b]`` cache positions causally."""
    B = len(starts)
    q, k, v = _inputs(B, T, S, N, K, H, jnp.float32, seed=3)
    starts, lengths = jnp.asarray(starts, jnp.int32), jnp.asarray(lengths, jnp.int32)
    kw = dict(sliding_window=window, softcap=softcap)
    out = attn.cached_attention(q, k, v, starts, lengths, impl="pallas_gpu", interpret=True, **kw)
    ref = attn.cached_attention(q, k, v, starts, lengths, impl="reference", **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOLERANCE["float32"])
    with pytest.raises(ValueError, match="inference-only"):
        jax.grad(
            lambda q: gpu.cached_attention(q, k, v, starts, lengths, interpret=True, **kw).sum()
        )(q)


def test_cached_attention_lowers_to_mosaic_gpu():
    spec = jax.ShapeDtypeStruct
    kv = spec((4, 2048, 8, 128), jnp.bfloat16)
    args = (spec((4, 16, 32, 128), jnp.bfloat16), kv, kv, spec((4,), jnp.int32))
    exported = jax.export.export(jax.jit(gpu.cached_attention), platforms=["cuda"])(*args, args[3])
    assert "mosaic_gpu" in exported.mlir_module()
