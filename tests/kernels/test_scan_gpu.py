"""The Pallas Mosaic GPU chunked scan in GPU interpret mode against the ``lax.scan`` oracle.

Interpret mode swaps the wgmmas for float32 ``dot_general``s, so these tests check the TMA
pipeline over chunks, the register-carried state, the decay masks and the output writes
(forward; gradients go through the jnp chunked form's VJP and are checked too); the wgmma path
itself is only cross-lowered for CUDA, with hardware shapes (bfloat16, ``C = K = V = 64``,
``K = 128`` and the Mamba-2 1.3B shape of ``kernels.bench scan``). The same for a decay per key
dimension (``gpu_vector``: XLA intra-chunk scores, kernel for the rest), at chunks 40 / 32 / 8
(sub-chunks of 8 or 16) and 64 in bfloat16, and cross-lowered at the GLA shape of the bench.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import scan
from kernels.bench import scan as bench_scan
from kernels.scan import gpu, gpu_vector
from tests.kernels.test_scan import VECTOR_CASES, assert_close, check_case, make_inputs


@pytest.mark.parametrize("name", ["gqa_chunk64"])
def test_forward_and_gradients_match_naive(name):
    check_case(name, "pallas_gpu", interpret=True)


@pytest.mark.parametrize("name", list(VECTOR_CASES))
def test_vector_decay_forward_and_gradients_match_naive(name):
    check_case(name, "pallas_gpu", interpret=True)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_bfloat16_forward(vector):
    q, k, v, a, s0 = make_inputs(1, 70, 1, 2, 64, 64, dtype="bfloat16", vector=vector)
    o, S = gpu.chunked_scan(q, k, v, a, s0, chunk_size=64, interpret=True)
    o_want, S_want = scan.reference.naive_scan(q, k, v, a, s0)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(o, o_want, "bfloat16")
    assert_close(S, S_want, "bfloat16")


def test_vector_intra_chunk_scores_are_the_pairwise_sum():
    """``A_ts = sum_d q_td k_sd exp(c_td - c_sd)`` on ``s <= t``, straight from the definition
    (float64 numpy), with decays strong enough that ``exp(-c)`` overflows float32."""
    rng = np.random.default_rng(0)
    B, N, H, C, K = 1, 1, 2, 32, 8
    q, k = rng.standard_normal((2, B, N, H, C, K))
    c = np.cumsum(-20.0 * rng.uniform(size=(B, N, H, C, K)), axis=3)
    want = np.einsum(
        "bnhtd,bnhsd,bnhtsd->bnhts", q, k, np.exp(c[..., :, None, :] - c[..., None, :, :])
    )
    want = want * np.tril(np.ones((C, C)))
    got = gpu_vector.intra_chunk_scores(*(jnp.asarray(x, jnp.float32) for x in (q, k, c)), Cs=16)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


MAMBA2 = bench_scan.SCAN_CASES[0]  # the shapes `kernels.bench scan` times on a GPU
GLA = bench_scan.SCAN_CASES[1]


@pytest.mark.parametrize(
    "B, T, H, G, K, V, vector",
    [
        (1, 200, 4, 1, 64, 64, False),
        (1, 200, 4, 2, 128, 64, False),
        (MAMBA2.B, MAMBA2.T, MAMBA2.H, MAMBA2.G, MAMBA2.K, MAMBA2.V, False),
        (1, 200, 4, 2, 64, 128, True),
        (GLA.B, GLA.T, GLA.H, GLA.G, GLA.K, GLA.V, True),
    ],
    ids=["G1_K64", "G2_K128", MAMBA2.name, "vector_G2_V128", GLA.name],
)
def test_lowers_for_cuda_forward_and_backward(B, T, H, G, K, V, vector):
    """The forward alone (what ``kernels.bench scan`` fwd compiles) and forward + VJP."""
    if not hasattr(jax, "export"):
        pytest.skip(f"jax {jax.__version__} has no jax.export: cannot cross-lower for CUDA")
    spec = jax.ShapeDtypeStruct
    f = functools.partial(gpu.chunked_scan, chunk_size=64)

    def fwd_bwd(q, k, v, a):
        (o, S), vjp = jax.vjp(f, q, k, v, a)
        return o, S, *vjp((o, S))

    args = [
        spec((B, T, G, K), jnp.bfloat16),
        spec((B, T, G, K), jnp.bfloat16),
        spec((B, T, H, V), jnp.bfloat16),
        spec((B, T, H, K) if vector else (B, T, H), jnp.float32),
    ]
    outs = [(B, T, H, V), (B, H, K, V)]
    for fn, want in ((f, outs), (fwd_bwd, outs + [a.shape for a in args])):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        assert "mosaic_gpu" in exported.mlir_module()
        assert [a.shape for a in exported.out_avals] == want


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_kernel_pins_lane_lowering_semantics(monkeypatch, vector):
    """JAX 0.11 made Warpgroup semantics (layout inference) the default, which fails on this
    kernel; CI runs an older JAX, so check that the kernel asks for Lane semantics itself."""
    seen = []
    kernel = gpu.plgpu.kernel
    monkeypatch.setattr(
        gpu.plgpu, "kernel", lambda *a, **kw: seen.append(kw["compiler_params"]) or kernel(*a, **kw)
    )
    q, k, v, a, s0 = make_inputs(1, 8, 1, 1, 8, 8, vector=vector)
    jax.eval_shape(functools.partial(gpu.chunked_scan, chunk_size=8, interpret=True), q, k, v, a)
    assert [p.lowering_semantics for p in seen] == [gpu.plgpu.LoweringSemantics.Lane]


def test_hardware_limits_are_errors():
    q, k, v, a, _ = make_inputs(1, 8, 1, 1, 64, 64)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gpu.chunked_scan(q, k, v, a)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    with pytest.raises(ValueError, match="chunk_size must be 64 on the GPU, got 32"):
        gpu.chunked_scan(*bf, a, chunk_size=32)
    q, k, v, a, _ = make_inputs(1, 8, 1, 1, 32, 64, dtype="bfloat16")
    with pytest.raises(ValueError, match="K and V multiples of 64, got 32, 64"):
        gpu.chunked_scan(q, k, v, a)
