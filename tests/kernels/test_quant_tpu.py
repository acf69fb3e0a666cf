"""Pallas TPU quantized matmul in TPU interpret mode against ``reference.matmul``.

Tiny shapes with small blocks that leave ``M``, ``N`` and ``K`` off the block grid, several
blocks along each axis; each case compiles once at XLA optimisation level 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import quant
from kernels.quant import reference, tpu
from tests.helpers import TOLERANCE

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
SMALL = tpu.BlockSizes(block_m=8, block_n=128, block_k=128)


def _inputs(M, K, N, dtype, scheme, group_size, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (K, N), jnp.float32)
    return x, reference.quantize(w, scheme, group_size=group_size)


def _kernel(x, qw, activations=None, block_sizes=SMALL):
    f = functools.partial(
        tpu.matmul, activations=activations, block_sizes=block_sizes, interpret=True
    )
    return jax.jit(f, compiler_options=_FAST_COMPILE)(x, qw)


def _assert_close(out, x, qw, activations=None):
    want = reference.matmul(x, qw, activations=activations)
    assert out.dtype == x.dtype and out.shape == want.shape
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    tol = TOLERANCE[jnp.dtype(x.dtype).name]
    # Accumulation error scales with the output, so atol is relative to its largest entry.
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())


CASES = {
    # name: (scheme, group_size, M, K, N, dtype, block_sizes)
    "int8_channel": ("int8", None, 20, 300, 200, "float32", SMALL),
    "int8_channel_bf16": ("int8", None, 5, 300, 200, "bfloat16", SMALL),
    "int4_group128": ("int4", 128, 5, 384, 200, "float32", tpu.BlockSizes(8, 128, 256)),
    "int4_group128_bf16": ("int4", 128, 5, 384, 200, "bfloat16", SMALL),
    "int4_channel": ("int4", None, 5, 300, 200, "bfloat16", tpu.BlockSizes(8, 128, 256)),
    "int4_channel_odd_k": ("int4", None, 5, 301, 200, "float32", SMALL),
    "fp8_channel": ("fp8", None, 5, 300, 200, "bfloat16", SMALL),
    "fp8_group128": ("fp8", 128, 12, 384, 200, "float32", tpu.BlockSizes(8, 128, 256)),
    "int8_group256_default_blocks": ("int8", 256, 5, 512, 200, "float32", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_weight_only_matches_reference(name):
    scheme, group_size, M, K, N, dtype, block_sizes = CASES[name]
    x, qw = _inputs(M, K, N, jnp.dtype(dtype), scheme, group_size)
    _assert_close(_kernel(x, qw, block_sizes=block_sizes), x, qw)


@pytest.mark.parametrize(
    "activations,dtype", [("int8", "float32"), ("int8", "bfloat16"), ("fp8", "float32")]
)
def test_w8a8_matches_reference(activations, dtype):
    x, qw = _inputs(20, 300, 200, jnp.dtype(dtype), activations, None, seed=1)
    _assert_close(_kernel(x, qw, activations), x, qw, activations)


def test_int4_nibbles_cover_the_whole_range():
    """Every nibble value, -8 included, in both halves of a byte, against a float64 product."""
    K, N = 256, 128
    rng = np.random.default_rng(0)
    q_KN = rng.integers(-8, 8, (K, N)).astype(np.int8)
    scales = rng.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    qw = reference.QuantizedWeight(
        reference.pack_int4(jnp.asarray(q_KN)), jnp.asarray(scales), "int4", None, (K, N)
    )
    x = rng.standard_normal((8, K)).astype(np.float32)
    want = (x.astype(np.float64) @ q_KN) * scales
    out = np.asarray(_kernel(jnp.asarray(x), qw))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dispatcher_routes_to_the_kernel(monkeypatch):
    x, qw = _inputs(5, 256, 130, jnp.float32, "int4", 128)
    calls = []
    kernel = tpu.matmul

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(tpu, "matmul", spy)
    out = quant.matmul(x, qw, impl="pallas_tpu", interpret=True)
    assert calls == [dict(activations=None, interpret=True)]
    _assert_close(out, x, qw)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_m=12), "block_m must be a positive multiple of 8"),
        (dict(block_m=0), "block_m must be a positive multiple of 8"),
        (dict(block_n=64), "block_n must be a positive multiple of 128"),
        (dict(block_k=200), "block_k must be a positive multiple of 128"),
        (dict(block_k=256.0), "block_k must be a positive multiple of 128"),
    ],
)
def test_block_sizes_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tpu.BlockSizes(**kwargs)


def test_block_k_must_hold_whole_groups():
    x, qw = _inputs(5, 512, 128, jnp.float32, "int8", 256)
    with pytest.raises(ValueError, match="block_k=384 must be a multiple of group_size=256"):
        tpu.matmul(x, qw, block_sizes=tpu.BlockSizes(8, 128, 384), interpret=True)


def test_groups_must_be_whole_lane_tiles():
    x, qw = _inputs(5, 256, 128, jnp.float32, "int4", 64)
    with pytest.raises(ValueError, match="group_size a multiple of 128, got 64"):
        tpu.matmul(x, qw, interpret=True)


def test_block_sizes_defaults():
    for_shape = tpu.BlockSizes.for_shape
    assert for_shape(16, 8192, 28672) == tpu.BlockSizes(16, 512, 1024)
    assert for_shape(4096, 8192, 28672, group_size=128) == tpu.BlockSizes(256, 512, 1024)
    assert for_shape(5, 300, 200) == tpu.BlockSizes(8, 256, 384)
    assert for_shape(300, 300, 200) == tpu.BlockSizes(256, 256, 384)
    assert for_shape(5, 512, 200, group_size=768) == tpu.BlockSizes(8, 256, 768)


@pytest.mark.parametrize(
    "scheme,group_size,activations,w_type,s_type",
    [
        ("int8", None, None, "4096x28672xi8", "1x28672xf32"),
        ("int4", 128, None, "2048x28672xi8", "32x1x28672xf32"),
        ("int4", None, None, "2048x28672xi8", "1x28672xf32"),
        ("fp8", 256, None, "4096x28672xf8E4M3FN", "16x1x28672xf32"),
        ("int8", None, "int8", "4096x28672xi8", "1x28672xf32"),
        ("fp8", None, "fp8", "4096x28672xf8E4M3FN", "1x28672xf32"),
    ],
)
def test_lowers_to_mosaic_with_quantized_operands(scheme, group_size, activations, w_type, s_type):
    """A decode GEMM lowers to one Mosaic TPU call that reads the stored bytes (no TPU needed)."""
    quantize = functools.partial(reference.quantize, scheme=scheme, group_size=group_size)
    qw = jax.eval_shape(quantize, jax.ShapeDtypeStruct((4096, 28672), jnp.float32))
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    f = jax.jit(functools.partial(tpu.matmul, activations=activations))
    hlo = f.trace(x, qw).lower(lowering_platforms=("tpu",)).as_text()
    (call,) = [line for line in hlo.splitlines() if "tpu_custom_call" in line]
    assert f"tensor<{w_type}>" in call and f"tensor<{s_type}>" in call
    assert call.endswith("-> tensor<16x28672xbf16>")
