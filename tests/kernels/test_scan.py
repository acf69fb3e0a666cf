"""kernels.scan: the chunked jnp form (``xla``) against the token-by-token ``lax.scan`` oracle.

Forward outputs and final states, and gradients in every input (``jax.vjp`` with random
cotangents for both outputs), over chunk sizes that do and do not divide ``T``, grouped
queries/keys (``G < H``), an initial state and decays strong enough that ``exp(-sum a)``
would overflow float32 if the chunked form exponentiated a positive number; the same for a
decay per key dimension (``log_decay [B, T, H, K]``, gated linear attention), with chunks that
are and are not multiples of the sub-chunk and every third key dimension decaying by up to
``a = -20`` per token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import scan
from tests.helpers import TOLERANCE


def _jit(fn):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def make_inputs(
    B, T, G, H, K, V, *, decay_scale=1.0, initial_state=True, dtype="float32", vector=False
):
    """Fixed-seed inputs (numpy, so no eager JAX op compiles); decays ``-scale * softplus(N)``,
    ``[B, T, H]``, or with ``vector`` ``[B, T, H, K]`` with every third key dimension's decay
    uniform in ``[-20, -10]`` instead."""
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((B, T, G, K)), dtype)
    k = jnp.asarray(rng.standard_normal((B, T, G, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype)
    a = -decay_scale * np.logaddexp(0.0, rng.standard_normal((B, T, H) + (K,) * vector))
    if vector:
        a[..., ::3] = rng.uniform(-20.0, -10.0, a[..., ::3].shape)
    a = jnp.asarray(a, jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32) if initial_state else None
    return q, k, v, a, s0


def assert_close(got, want, dtype="float32"):
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = TOLERANCE[jnp.dtype(dtype).name]
    # Errors of sums over many tokens scale with the largest entry, hence a relative atol.
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1.0))


def run_with_grads(fn, q, k, v, a, s0):
    """``(o, state)`` and the gradients of ``<o, do> + <state, dS>`` wrt every input."""
    B, T, H, V = v.shape
    kd1, kd2 = jax.random.split(jax.random.key(1))
    do = jax.random.normal(kd1, (B, T, H, V), jnp.float32).astype(v.dtype)
    dS = jax.random.normal(kd2, (B, H, q.shape[-1], V), jnp.float32)
    (o, S), vjp = jax.vjp(fn, q, k, v, a, s0)
    return (o, S), vjp((do, dS))


CASES = {
    # name: ((B, T, G, H, K, V), chunk_size, kwargs of make_inputs)
    "tail_chunk_gqa": ((2, 45, 2, 4, 16, 8), 16, {}),
    "strong_decay_no_init": (
        (1, 40, 1, 2, 16, 16),
        8,
        dict(decay_scale=200.0, initial_state=False),
    ),
    "chunk_longer_than_T_weak_decay": ((1, 20, 1, 1, 8, 16), 64, dict(decay_scale=1e-3)),
}
# Decay per key dimension: chunk 40 = sub-chunks 16 + 16 + 8 (padded), chunk 32 = 2 x 16, 8 < 16.
VECTOR_CASES = {
    "vector_tail_chunk_gqa": ((2, 45, 2, 4, 16, 8), 40, dict(vector=True)),
    "vector_strong_decay_no_init": (
        (1, 40, 1, 2, 16, 16),
        32,
        dict(vector=True, decay_scale=20.0, initial_state=False),
    ),
    "vector_small_chunk_weak_decay": ((1, 20, 1, 2, 8, 16), 8, dict(vector=True, decay_scale=1e-2)),
}
# Kernel-only cases (not run on the xla path): the GPU kernel's 64-token chunks.
KERNEL_CASES = {"gqa_chunk64": ((1, 100, 2, 4, 32, 32), 64, {})}
ALL_CASES = CASES | VECTOR_CASES | KERNEL_CASES


@functools.cache
def expected(name):
    """The oracle's outputs and gradients for ``CASES[name]`` (shared with the kernel tests)."""
    (B, T, G, H, K, V), _, kwargs = ALL_CASES[name]
    inputs = make_inputs(B, T, G, H, K, V, **kwargs)
    return _jit(functools.partial(run_with_grads, scan.reference.naive_scan))(*inputs)


def check_case(name, impl, **kw):
    """``impl`` (with options ``kw``) matches the oracle on ``CASES[name]``."""
    (B, T, G, H, K, V), chunk_size, kwargs = ALL_CASES[name]
    dtype = kwargs.get("dtype", "float32")

    def f(q, k, v, a, s0):
        return scan.chunked_scan(
            q, k, v, a, chunk_size=chunk_size, initial_state_BHKV=s0, impl=impl, **kw
        )

    inputs = make_inputs(B, T, G, H, K, V, **kwargs)
    got, got_grads = _jit(functools.partial(run_with_grads, f))(*inputs)
    want, want_grads = expected(name)
    assert got[0].dtype == inputs[2].dtype and got[1].dtype == jnp.float32
    for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        if w is None:
            assert g is None
        else:
            assert np.isfinite(np.asarray(g, np.float32)).all()
            assert_close(g, w, dtype)


@pytest.mark.parametrize("name", list(CASES | VECTOR_CASES))
def test_chunked_matches_naive_forward_and_gradients(name):
    check_case(name, "xla")


def test_naive_vector_decay_matches_a_python_loop():
    B, T, G, H, K, V = 1, 6, 1, 2, 3, 4
    inputs = make_inputs(B, T, G, H, K, V, vector=True)
    q, k, v, a, s0 = (np.asarray(x, np.float64) for x in inputs)
    o, S = scan.chunked_scan(*inputs[:4], initial_state_BHKV=inputs[4], impl="reference")
    o, S = np.asarray(o), np.asarray(S)
    S_want = s0.copy()
    for t in range(T):
        for h in range(H):
            S_want[0, h] = np.exp(a[0, t, h])[:, None] * S_want[0, h] + np.outer(
                k[0, t, 0], v[0, t, h]
            )
            np.testing.assert_allclose(o[0, t, h], q[0, t, 0] @ S_want[0, h], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(S, S_want, rtol=1e-5, atol=1e-7)


def test_vector_decay_equal_across_keys_is_the_scalar_scan():
    q, k, v, a, s0 = make_inputs(1, 37, 1, 2, 8, 8)
    f = functools.partial(scan.chunked_scan, chunk_size=24, initial_state_BHKV=s0, impl="xla")
    o, S = f(q, k, v, jnp.broadcast_to(a[..., None], a.shape + (8,)))
    o_want, S_want = f(q, k, v, a)
    assert_close(o, o_want)
    assert_close(S, S_want)


def test_naive_matches_a_python_loop():
    B, T, G, H, K, V = 1, 6, 1, 2, 3, 4
    q, k, v, a, s0 = (np.asarray(x, np.float64) for x in make_inputs(B, T, G, H, K, V))
    o, S = scan.chunked_scan(
        *map(jnp.asarray, (q, k, v, a)), initial_state_BHKV=s0, impl="reference"
    )
    o, S = np.asarray(o), np.asarray(S)
    S_want = s0.copy()
    for t in range(T):
        for h in range(H):
            S_want[0, h] = np.exp(a[0, t, h]) * S_want[0, h] + np.outer(k[0, t, 0], v[0, t, h])
            np.testing.assert_allclose(o[0, t, h], q[0, t, 0] @ S_want[0, h], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(S, S_want, rtol=1e-5)


def test_padding_with_zero_decay_and_keys_keeps_the_state():
    q, k, v, a, s0 = make_inputs(1, 21, 1, 2, 8, 8)
    pad = [(0, 0), (0, 11)]
    padded = (
        jnp.pad(q, pad + [(0, 0)] * 2),
        jnp.pad(k, pad + [(0, 0)] * 2),
        jnp.pad(v, pad + [(0, 0)] * 2, constant_values=3.0),  # any v: k = 0 drops it
        jnp.pad(a, pad + [(0, 0)]),
    )
    f = functools.partial(scan.chunked_scan, chunk_size=8, initial_state_BHKV=s0, impl="xla")
    o, S = f(q, k, v, a)
    o_pad, S_pad = f(*padded)
    assert_close(o_pad[:, :21], o)
    assert_close(S_pad, S)


def test_bfloat16_inputs_give_bfloat16_outputs_and_float32_state():
    q, k, v, a, s0 = make_inputs(1, 33, 1, 2, 16, 16, dtype="bfloat16")
    o, S = scan.chunked_scan(q, k, v, a, chunk_size=16, initial_state_BHKV=s0, impl="xla")
    o_want, S_want = scan.chunked_scan(q, k, v, a, initial_state_BHKV=s0, impl="reference")
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(o, o_want, "bfloat16")
    assert_close(S, S_want, "bfloat16")


def test_auto_is_xla_off_tpu(monkeypatch):
    calls = []
    chunked = scan.reference.chunked_scan
    monkeypatch.setattr(
        scan.reference, "chunked_scan", lambda *a, **kw: calls.append(kw) or chunked(*a, **kw)
    )
    q, k, v, a, _ = make_inputs(1, 5, 1, 1, 4, 4)
    scan.chunked_scan(q, k, v, a, chunk_size=4, impl="auto")
    assert calls == [{"chunk_size": 4}]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=jnp.zeros((1, 8, 1, 4, 1))), r"q and k \[B, T, G, K\].*q\(1, 8, 1, 4, 1\)"),
        (dict(k=jnp.zeros((1, 8, 1, 5))), r"same shape.*k\(1, 8, 1, 5\)"),
        (dict(v=jnp.zeros((1, 7, 2, 4))), r"\(B, T\) = \(1, 8\).*v\(1, 7, 2, 4\)"),
        (
            dict(q=jnp.zeros((1, 8, 3, 4)), k=jnp.zeros((1, 8, 3, 4))),
            "the 3 q/k groups must divide the 2 heads",
        ),
        (dict(a=jnp.zeros((1, 8, 3))), r"log_decay must have shape \(B, T, H\) = \(1, 8, 2\)"),
        (
            dict(a=jnp.zeros((1, 8, 2, 5))),
            r"\(B, T, H, K\) = \(1, 8, 2, 4\); got .*log_decay\(1, 8, 2, 5\)",
        ),
        (dict(a=jnp.zeros((1, 8, 2, 4, 1))), r"log_decay \[B, T, H\] or \[B, T, H, K\]"),
        (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
        (dict(s0=jnp.zeros((1, 2, 4, 5))), r"\(B, H, K, V\) = \(1, 2, 4, 4\); got \(1, 2, 4, 5\)"),
        (dict(impl="cuda"), r"unknown chunked_scan impl 'cuda'; valid: \['auto', 'reference'"),
        (dict(q=jnp.zeros((1, 8, 1, 4), jnp.int32)), "q must be floating point, got int32"),
    ],
)
def test_errors_name_the_values(change, match):
    args = (
        dict(
            q=jnp.zeros((1, 8, 1, 4)),
            k=jnp.zeros((1, 8, 1, 4)),
            v=jnp.zeros((1, 8, 2, 4)),
            a=jnp.zeros((1, 8, 2)),
            s0=None,
            chunk_size=4,
            impl="xla",
            interpret=False,
        )
        | change
    )
    with pytest.raises(ValueError, match=match):
        scan.chunked_scan(
            args["q"],
            args["k"],
            args["v"],
            args["a"],
            chunk_size=args["chunk_size"],
            initial_state_BHKV=args["s0"],
            impl=args["impl"],
            interpret=args["interpret"],
        )


@pytest.mark.parametrize(
    ("backend", "hopper", "dtype", "K", "vector", "want"),
    [
        ("tpu", False, jnp.float32, 16, False, "pallas_tpu"),
        ("gpu", True, jnp.bfloat16, 128, False, "pallas_gpu"),
        ("gpu", True, jnp.float32, 128, False, "xla"),
        ("gpu", True, jnp.bfloat16, 96, False, "xla"),
        ("gpu", True, jnp.bfloat16, 128, True, "xla"),
        ("gpu", False, jnp.bfloat16, 128, False, "xla"),
        ("cpu", False, jnp.bfloat16, 128, False, "xla"),
    ],
)
def test_auto_picks_the_measured_winner(monkeypatch, backend, hopper, dtype, K, vector, want):
    import kernels.attention

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(kernels.attention, "_is_hopper", lambda: hopper)
    q = jnp.zeros((1, 8, 1, K), dtype)
    v = jnp.zeros((1, 8, 2, 64), dtype)
    decay = jnp.zeros((1, 8, 2, K) if vector else (1, 8, 2), jnp.float32)
    assert scan._resolve_impl("auto", q, v, decay) == want
