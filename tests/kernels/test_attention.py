"""kernels.attention against a per-query numpy loop (the independent oracle)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention as attn
from tests.helpers import TOLERANCE


def naive(q, k, v, q_pos, kv_len, *, causal, window, softcap, scale):
    """One query at a time in float64: softmax over the keys it may see."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, H))
    for b, t, n in itertools.product(range(B), range(T), range(N)):
        p = q_pos[b][t]
        keys = [s for s in range(S) if s < kv_len[b] and (not causal or s <= p)]
        if window is not None:
            keys = [s for s in keys if s > p - window]
        if not keys:
            continue
        kh = n // (N // K)
        logits = np.array([q[b, t, n] @ k[b, s, kh] for s in keys]) * scale
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[b, t, n] = sum(wi * v[b, s, kh] for wi, s in zip(w, keys, strict=True))
    return out


def _qkv(B, T, S, N, K, H, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    return q, k, v


CASES = [
    # (N, K, causal, window, lengths, softcap)
    (4, 4, True, None, None, None),  # MHA
    (4, 2, True, None, (9, 5), None),  # GQA, ragged lengths
    (4, 1, True, 3, None, None),  # MQA, sliding window
    (2, 1, False, None, (7, 9), None),  # non-causal with lengths
    (4, 2, True, 4, (9, 6), 5.0),  # everything at once
]


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N,K,causal,window,lengths,softcap", CASES)
def test_attention_matches_naive(impl, dtype, N, K, causal, window, lengths, softcap):
    B, T, S, H = 2, 5, 9, 8
    q, k, v = _qkv(B, T, S, N, K, H, jnp.dtype(dtype))
    lengths_arr = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    out = attn.attention(
        q,
        k,
        v,
        causal=causal,
        sliding_window=window,
        lengths=lengths_arr,
        softcap=softcap,
        impl=impl,
    )
    assert out.shape == (B, T, N, H) and out.dtype == q.dtype
    q_pos = [[S - T + t for t in range(T)]] * B
    want = naive(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        q_pos,
        lengths or (S, S),
        causal=causal,
        window=window,
        softcap=softcap,
        scale=H**-0.5,
    )
    tol = TOLERANCE[dtype] * (10 if dtype == "float32" else 1)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [None, 3])
def test_decode_and_cached_attention_match_naive(window):
    B, S, N, K, H = 3, 12, 4, 2, 8
    q, k, v = _qkv(B, 4, S, N, K, H, jnp.float32, seed=1)
    lengths = np.array([12, 5, 1], np.int32)
    out = attn.decode_attention(q[:, 0], k, v, jnp.asarray(lengths), sliding_window=window)
    want = naive(
        q[:, :1],
        k,
        v,
        [[n - 1] for n in lengths],
        lengths,
        causal=True,
        window=window,
        softcap=None,
        scale=H**-0.5,
    )
    np.testing.assert_allclose(np.asarray(out), want[:, 0], atol=1e-5, rtol=1e-5)

    starts = np.array([8, 0, 3], np.int32)
    ends = starts + np.array([4, 2, 3], np.int32)
    out = attn.cached_attention(
        q, k, v, jnp.asarray(starts), jnp.asarray(ends), sliding_window=window
    )
    q_pos = [[s + t for t in range(4)] for s in starts]
    want = naive(q, k, v, q_pos, ends, causal=True, window=window, softcap=None, scale=H**-0.5)
    valid = np.arange(4)[None, :] < (ends - starts)[:, None]
    np.testing.assert_allclose(np.asarray(out)[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero_and_gradients_finite():
    q, k, v = _qkv(2, 3, 3, 2, 1, 4, jnp.float32)
    lengths = jnp.asarray([0, 3], jnp.int32)
    out = attn.attention(q, k, v, lengths=lengths)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    grads = jax.grad(lambda q: attn.attention(q, k, v, lengths=lengths).sum())(q)
    assert np.isfinite(np.asarray(grads)).all()


def test_causality_via_gradients():
    q, k, v = _qkv(1, 6, 6, 2, 2, 4, jnp.float32)
    # d out[t] / d v[s] is the attention weight: zero exactly for s > t, positive otherwise.
    jac = jax.jacobian(lambda v: attn.attention(q, k, v).sum(axis=(2, 3)))(v)  # [B,T,B,S,K,H]
    influence = np.abs(np.asarray(jac)).sum(axis=(4, 5))[0, :, 0]  # [T, S]
    assert np.all(influence[np.triu_indices(6, 1)] == 0)
    assert np.all(influence[np.tril_indices(6)] > 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=(2, 3, 5, 8), k=(2, 3, 2, 8)), "not divisible"),
        (dict(q=(2, 3, 4, 8), k=(2, 3, 2, 4)), "batch/head_dim mismatch"),
        (dict(q=(2, 4, 4, 8), k=(2, 3, 2, 8)), "more queries than keys"),
        (dict(q=(2, 3, 4), k=(2, 3, 2, 8)), "rank 4"),
    ],
)
def test_bad_shapes_get_clear_errors(kwargs, match):
    q = jnp.zeros(kwargs["q"])
    k = jnp.zeros(kwargs["k"])
    with pytest.raises(ValueError, match=match):
        attn.attention(q, k, k)


def test_mixed_dtypes_and_zero_window_get_clear_errors():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    k = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="must share a dtype, got bfloat16, float32"):
        attn.attention(q, k, k)
    with pytest.raises(ValueError, match="must share a dtype"):
        attn.decode_attention(q[:, 0], k, k, jnp.array([4]))
    with pytest.raises(ValueError, match="sliding_window"):
        attn.attention(k, k, k, sliding_window=0)


def test_unknown_impl_lists_valid():
    q, k, v = _qkv(1, 2, 2, 2, 2, 4, jnp.float32)
    with pytest.raises(ValueError, match="valid: .*reference"):
        attn.attention(q, k, v, impl="triton")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(softcap=5.0), "cudnn' does not support softcap"),
        (dict(dtype=jnp.float32), "cudnn' needs bfloat16 or float16"),
        (dict(T=3), "causal attention only with T == S.*T=3, S=4"),
        (dict(causal=False, sliding_window=2), "sliding_window only with causal=True"),
        (dict(), "cudnn' needs a CUDA GPU backend .*'cpu'"),
    ],
)
def test_cudnn_unsupported_options_and_backend_get_clear_errors(kwargs, match):
    dtype, T = kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("T", 4)
    q, k, v = _qkv(1, T, 4, 2, 1, 8, dtype)
    with pytest.raises(ValueError, match=match):
        attn.attention(q, k, v, impl="cudnn", **kwargs)


def test_pallas_impls_without_their_backend_get_clear_errors():
    q, k, v = _qkv(1, 4, 4, 2, 1, 8, jnp.float32)
    lengths = jnp.asarray([4], jnp.int32)
    with pytest.raises(ValueError, match="pallas_gpu' needs a GPU backend .*interpret=True"):
        attn.attention(q, k, v, impl="pallas_gpu")
    with pytest.raises(ValueError, match="pallas_gpu' needs a GPU backend .*interpret=True"):
        attn.decode_attention(q[:, 0], k, v, lengths, impl="pallas_gpu")
    with pytest.raises(ValueError, match="pallas_tpu' needs a TPU backend .*interpret=True"):
        attn.attention(q, k, v, impl="pallas_tpu")
    with pytest.raises(ValueError, match="decode_attention does not support impl='cudnn'"):
        attn.decode_attention(q[:, 0], k, v, lengths, impl="cudnn")
    with pytest.raises(ValueError, match="cached_attention does not support impl='pallas_tpu'"):
        attn.cached_attention(q, k, v, lengths - 4, lengths, impl="pallas_tpu")


@pytest.mark.parametrize(
    "impl, op",
    [
        ("pallas_tpu", "attention"),
        ("pallas_tpu", "decode_attention"),
        ("pallas_gpu", "attention"),
        ("pallas_gpu", "decode_attention"),
    ],
)
def test_pallas_interpret_routes_to_its_kernel(impl, op):
    q, k, v = _qkv(2, 4, 8, 2, 1, 64, jnp.float32)
    if op == "attention":
        run = lambda impl, **kw: attn.attention(q, k, v, impl=impl, **kw)
    else:
        lengths = jnp.asarray([8, 3], jnp.int32)
        run = lambda impl, **kw: attn.decode_attention(q[:, 0], k, v, lengths, impl=impl, **kw)
    out = run(impl, interpret=True)
    np.testing.assert_allclose(out, run("reference"), atol=1e-5, rtol=1e-5)
