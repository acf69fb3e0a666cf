"""kernels.quant: storage format, quantization error bounds, the jnp matmul paths and errors.

Oracles: a float64 numpy recomputation of the absmax scales and rounding, and ``x @ w`` in
float64 for the matmul paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import quant


def _weight(K, N, seed=0):
    return jax.random.normal(jax.random.key(seed), (K, N), jnp.float32)


@pytest.mark.parametrize(
    "scheme, group_size, qmax", [("int8", None, 127), ("int8", 64, 127), ("int4", 128, 7),
                                 ("int4", None, 7)],
)  # fmt: skip
def test_integer_error_within_half_a_step(scheme, group_size, qmax):
    K, N = 256, 48
    w = _weight(K, N)
    qw = quant.quantize(w, scheme, group_size=group_size)
    rows = group_size or K
    w64 = np.asarray(w, np.float64).reshape(K // rows, rows, N)
    scale = np.abs(w64).max(axis=1) / qmax  # numpy oracle of the absmax scale
    np.testing.assert_allclose(np.asarray(qw.scales), scale, rtol=1e-6)
    err = np.abs(np.asarray(quant.dequantize(qw), np.float64).reshape(w64.shape) - w64)
    assert np.all(err <= scale[:, None, :] / 2 * (1 + 1e-5))
    assert err.max() > scale.min() / 8  # really quantized, not passed through


def test_fp8_error_is_relative():
    w = _weight(128, 32, seed=1)
    qw = quant.quantize(w, "fp8")
    assert qw.values.dtype == jnp.float8_e4m3fn
    d, w = np.asarray(quant.dequantize(qw)), np.asarray(w)
    big = np.abs(w) > np.asarray(qw.scales) * 2**-6 * 8  # above e4m3's subnormal range
    assert np.all(np.abs(d - w)[big] <= np.abs(w)[big] * 2**-4)


def test_int4_packing_round_trips_every_value_and_halves_the_bytes():
    q = jnp.asarray(np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(3, axis=1))
    packed = quant.pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (8, 3)
    # Row 2i sits in the low nibble: -8 (0x8) low, -7 (0x9) high -> 0x98.
    assert int(packed[0, 0]) == 0x98
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, 16)), np.asarray(q))
    odd = q[:15]
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(quant.pack_int4(odd), 15)), odd)
    w = _weight(256, 64)
    assert quant.quantize(w, "int4", group_size=128).nbytes == 256 * 64 // 2 + 2 * 64 * 4
    assert quant.quantize(w, "int8").nbytes == 256 * 64 + 64 * 4


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32), ("fp8", None)])
def test_weight_only_matmul_equals_x_times_dequantized(impl, scheme, group_size):
    x = jax.random.normal(jax.random.key(2), (5, 96), jnp.float32)
    qw = quant.quantize(_weight(96, 40), scheme, group_size=group_size)
    want = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(qw), np.float64)
    got = quant.matmul(x, qw, impl=impl)
    assert got.shape == (5, 40) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_bfloat16_activations_keep_their_dtype():
    x = jax.random.normal(jax.random.key(3), (4, 64), jnp.bfloat16)
    qw = quant.quantize(_weight(64, 16), "int8")
    got = quant.matmul(x, qw, impl="xla")
    want = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(qw), np.float64)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=0.15)


@pytest.mark.parametrize("activations", ["int8", "fp8"])
def test_w8a8_matches_per_row_quantized_activations(activations):
    """Oracle: quantize each row of x with its own absmax scale (numpy), multiply the integer
    (or e4m3) values exactly in float64, then apply both scales."""
    x = jax.random.normal(jax.random.key(4), (6, 128), jnp.float32) * jnp.arange(1, 7)[:, None]
    qw = quant.quantize(_weight(128, 24), activations)
    x64 = np.asarray(x, np.float64)
    sx = np.abs(x64).max(axis=1, keepdims=True) / (127.0 if activations == "int8" else 448.0)
    if activations == "int8":
        xq = np.clip(np.round(x64 / sx), -127, 127)
    else:
        xq = np.asarray(jnp.asarray(x64 / sx, jnp.float32).astype(jnp.float8_e4m3fn), np.float64)
    wq = np.asarray(qw.values.astype(jnp.float32), np.float64)
    want = (xq @ wq) * sx * np.asarray(qw.scales, np.float64)
    got = quant.matmul(x, qw, activations=activations)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
    # And it is an approximation of the float product, not something else.
    exact = x64 @ np.asarray(_weight(128, 24), np.float64)
    assert np.linalg.norm(np.asarray(got) - exact) / np.linalg.norm(exact) < 0.06


def test_quantized_weight_is_a_pytree():
    qw = quant.quantize(_weight(64, 8), "int4", group_size=32)
    leaves, tree = jax.tree.flatten(qw)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.float32]
    again = jax.tree.unflatten(tree, leaves)
    assert again.scheme == "int4" and again.group_size == 32 and again.shape == (64, 8)
    doubled = jax.jit(lambda q: quant.dequantize(q) * 2)(qw)
    np.testing.assert_allclose(np.asarray(doubled), 2 * np.asarray(quant.dequantize(qw)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda w, x: quant.quantize(w, "int3"), "unknown quantization scheme 'int3'"),
        (lambda w, x: quant.quantize(w, "int4", group_size=48), "group_size=48 must be"),
        (lambda w, x: quant.quantize(w.astype(jnp.int8), "int8"), "float \\[K, N\\] weight"),
        (lambda w, x: quant.matmul(x, w), "expected a QuantizedWeight"),
        (lambda w, x: quant.dequantize(w), "expected a QuantizedWeight"),
        (lambda w, x: quant.matmul(x[:, :10], quant.quantize(w, "int8")), "K=64"),
        (lambda w, x: quant.matmul(x, quant.quantize(w, "int8"), impl="triton"), "valid: "),
        (
            lambda w, x: quant.matmul(x, quant.quantize(w, "int4"), activations="int8"),
            "needs a per-channel int8 weight",
        ),
        (lambda w, x: quant.matmul(x, quant.quantize(w, "int8"), activations="int4"), "unknown"),
        (
            lambda w, x: quant.matmul(x, quant.quantize(w, "int8"), impl="pallas_tpu"),
            "needs a TPU backend",
        ),
    ],
)
def test_bad_input_gets_clear_errors(call, match):
    w, x = _weight(64, 16), jnp.ones((3, 64))
    with pytest.raises(ValueError, match=match):
        call(w, x)


@pytest.mark.parametrize(
    ("backend", "hopper", "dtype", "group_size", "want"),
    [
        ("gpu", True, jnp.bfloat16, None, "pallas_gpu"),
        ("gpu", True, jnp.float16, 128, "pallas_gpu"),
        ("gpu", True, jnp.float32, None, "xla"),
        ("gpu", True, jnp.bfloat16, 64, "xla"),
        ("gpu", False, jnp.bfloat16, None, "xla"),
        ("cpu", False, jnp.bfloat16, None, "xla"),
    ],
)
def test_auto_picks_the_measured_winner(monkeypatch, backend, hopper, dtype, group_size, want):
    import kernels.attention
    import kernels.quant

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(kernels.attention, "_is_hopper", lambda: hopper)
    qw = quant.quantize(jnp.ones((256, 128), jnp.float32), "int8", group_size=group_size)
    assert kernels.quant._auto(jnp.ones((4, 256), dtype), qw) == want
