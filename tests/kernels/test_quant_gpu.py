"""Pallas Mosaic GPU quantized matmul in GPU interpret mode against ``reference.matmul``, and
cross-lowered for CUDA on CPU.

Interpret mode swaps the wgmmas for float32 ``dot_general``s and skips the register layout
casts (as ``kernels.attention.gpu`` does), so these tests check the TMA pipeline, the padding,
int4 unpacking and the scales; the wgmma, layout and SMEM rules run in the cross-lowering
tests. ``M``, ``K`` and ``N`` are off the block grid, with several blocks along ``N``.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import quant
from kernels.quant import gpu, gpu_w8a8, reference
from tests.helpers import TOLERANCE


def _inputs(M, K, N, dtype, scheme, group_size, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (K, N), jnp.float32)
    return x, reference.quantize(w, scheme, group_size=group_size)


def _assert_close(out, x, qw):
    want = reference.matmul(x, qw)
    assert out.dtype == x.dtype and out.shape == want.shape
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    tol = TOLERANCE[jnp.dtype(x.dtype).name]
    # Accumulation error scales with the output, so atol is relative to its largest entry.
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())


B64 = gpu.BlockSizes(block_m=8, block_n=64, block_k=64, num_stages=2)
B128 = gpu.BlockSizes(block_m=16, block_n=64, block_k=128, num_stages=3)
CASES = {
    # name: (scheme, group_size, M, K, N, dtype, block_sizes)
    "int8_channel": ("int8", None, 5, 320, 200, "float32", B128),
    "int8_channel_bf16": ("int8", None, 16, 384, 200, "bfloat16", B64),
    "int4_group128": ("int4", 128, 5, 384, 200, "float32", B128),
    "int4_group128_bf16": ("int4", 128, 16, 384, 200, "bfloat16", B128),
    "int4_channel": ("int4", None, 16, 320, 200, "float32", B128),
    "fp8_channel_bf16": ("fp8", None, 5, 384, 200, "bfloat16", B128),
    "fp8_group64": ("fp8", 64, 16, 320, 200, "float32", B64),
    "int8_group128_default_blocks": ("int8", 128, 5, 384, 200, "float32", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_weight_only_matches_reference(name):
    scheme, group_size, M, K, N, dtype, block_sizes = CASES[name]
    x, qw = _inputs(M, K, N, dtype, scheme, group_size)
    out = gpu.matmul(x, qw, block_sizes=block_sizes, interpret=True)
    _assert_close(out, x, qw)


def test_public_op_routes_pallas_gpu_to_the_kernel(monkeypatch):
    calls, kernel = [], gpu.matmul

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(gpu, "matmul", spy)
    x, qw = _inputs(7, 256, 72, "float32", "int4", 128, seed=1)
    out = quant.matmul(x, qw, impl="pallas_gpu", interpret=True)
    assert calls == [dict(activations=None, interpret=True)]
    _assert_close(out, x, qw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_m=12), "block_m must be a positive multiple of 8"),
        (dict(block_n=96), "block_n must be a positive multiple of 64"),
        (dict(block_k=512), "block_k must be a positive multiple of 64 and <= 256"),
        (dict(num_stages=0), "num_stages must be an int >= 1"),
    ],
)
def test_block_sizes_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gpu.BlockSizes(**kwargs)


@pytest.mark.parametrize(
    "scheme, group_size, block_sizes, match",
    [
        ("int4", None, B64, "int4 needs block_k a multiple of 128"),
        ("fp8", 64, B128, "group_size=64 must be a multiple of block_k=128"),
        ("int8", None, gpu.BlockSizes(256, 256, 256, 4), "bytes of SMEM"),
    ],
)
def test_blocks_that_do_not_fit_the_weight_are_refused(scheme, group_size, block_sizes, match):
    x, qw = _inputs(4, 256, 64, "bfloat16", scheme, group_size)
    with pytest.raises(ValueError, match=match):
        gpu.matmul(x, qw, block_sizes=block_sizes)


W8A8_CASES = {
    # name: (activations, M, K, N, dtype, block_sizes): M, K, N off the block grid
    "int8_f32": ("int8", 70, 300, 200, "float32", gpu_w8a8.BlockSizes(64, 128, 128, 2)),
    "int8_bf16_default_blocks": ("int8", 5, 260, 130, "bfloat16", None),
    "fp8_bf16": ("fp8", 130, 384, 200, "bfloat16", gpu_w8a8.BlockSizes(128, 64, 128, 3)),
}


@pytest.mark.parametrize("name", list(W8A8_CASES))
def test_w8a8_matches_reference(name):
    """The 8-bit x 8-bit kernel (int32 / float32 accumulation, both scales in the epilogue)
    against ``reference.matmul`` that quantizes x per row the same way."""
    activations, M, K, N, dtype, block_sizes = W8A8_CASES[name]
    x, qw = _inputs(M, K, N, dtype, activations, None)
    out = gpu.matmul(x, qw, activations=activations, block_sizes=block_sizes, interpret=True)
    want = reference.matmul(x, qw, activations=activations)
    assert out.dtype == x.dtype and out.shape == (M, N)
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    # Same integer products; only the float32 scaling and the final rounding may differ.
    tol = TOLERANCE[jnp.dtype(dtype).name]
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())


def test_float32_on_gpu_and_bad_w8a8_blocks_are_refused():
    x, qw = _inputs(4, 128, 64, "float32", "int8", None)
    with pytest.raises(ValueError, match="needs float16 or bfloat16 x"):
        gpu.matmul(x, qw)
    with pytest.raises(ValueError, match="returns float16 or bfloat16"):
        gpu.matmul(x, qw, activations="int8")
    with pytest.raises(ValueError, match="block_m must be 64 or 128"):
        gpu_w8a8.BlockSizes(block_m=32)
    with pytest.raises(ValueError, match="more than 128 registers"):
        gpu_w8a8.BlockSizes(block_m=128, block_n=256)


def _weight_spec(scheme, group_size, K, N):
    spec = jax.ShapeDtypeStruct
    values = {
        "int8": spec((K, N), jnp.int8),
        "int4": spec((K // 2, N), jnp.uint8),
        "fp8": spec((K, N), reference.FP8),
    }[scheme]
    G = 1 if group_size is None else K // group_size
    return reference.QuantizedWeight(values, spec((G, N), jnp.float32), scheme, group_size, (K, N))


def _tma_sources(jaxpr):
    """Avals of the HBM refs that TMA copies read, anywhere in the (nested) jaxpr."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "copy_gmem_to_smem":
            found.add((eqn.invars[0].aval.shape, jnp.dtype(eqn.invars[0].aval.dtype).name))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _tma_sources(sub)
    return found


def test_weight_reaches_the_kernel_in_its_stored_bytes():
    """TMA reads the packed int4 bytes (viewed as int8: 4096 rows for K = 8192), the even and
    odd columns of x and the scale rows; no dequantized weight exists in HBM."""
    qw = _weight_spec("int4", 128, 8192, 28672)
    x = jax.ShapeDtypeStruct((16, 8192), jnp.bfloat16)
    assert _tma_sources(jax.make_jaxpr(gpu.matmul)(x, qw).jaxpr) == {
        ((16, 4096), "bfloat16"),
        ((4096, 28672), "int8"),
        ((64, 28672), "float32"),
    }


DECODE, PREFILL = (16, 8192, 28672), (4096, 4096, 4096)


@pytest.mark.parametrize(
    "shape, scheme, group_size, dtype",
    [
        (DECODE, "int8", None, jnp.bfloat16),
        (DECODE, "int4", 128, jnp.bfloat16),
        (DECODE, "fp8", None, jnp.bfloat16),
        (DECODE, "fp8", 128, jnp.float16),
        (PREFILL, "int8", None, jnp.bfloat16),
        (PREFILL, "int4", 128, jnp.bfloat16),
        (PREFILL, "fp8", None, jnp.bfloat16),
    ],
)
def test_lowers_to_mosaic_gpu(shape, scheme, group_size, dtype):
    """Cross-lowering for CUDA on CPU runs the Pallas->Mosaic GPU rules (wgmma with a register
    A operand, the transposed register layouts, TMA, and the SMEM limit)."""
    M, K, N = shape
    assert gpu.smem_bytes(gpu.BlockSizes.for_shape(M, K, N), scheme, dtype) <= gpu._SMEM_LIMIT
    x = jax.ShapeDtypeStruct((M, K), dtype)
    exported = jax.export.export(jax.jit(gpu.matmul), platforms=["cuda"])(
        x, _weight_spec(scheme, group_size, K, N)
    )
    assert "mosaic_gpu" in exported.mlir_module()
    assert exported.out_avals[0].shape == (M, N)


@pytest.mark.parametrize("shape", [DECODE, (8192, 8192, 8192)])
@pytest.mark.parametrize("activations", ["int8", "fp8"])
def test_w8a8_lowers_to_mosaic_gpu(shape, activations):
    """The 8-bit wgmmas (int8 into int32, e4m3 into float32) with both operands K-major, the
    in-place accumulator and the scale epilogue pass Mosaic GPU's lowering rules for CUDA."""
    M, K, N = shape
    bs = gpu_w8a8.BlockSizes.for_shape(M)
    assert gpu_w8a8.smem_bytes(bs, jnp.bfloat16) <= gpu_w8a8._SMEM_LIMIT
    x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
    fn = jax.jit(functools.partial(gpu.matmul, activations=activations))
    exported = jax.export.export(fn, platforms=["cuda"])(x, _weight_spec(activations, None, K, N))
    assert "mosaic_gpu" in exported.mlir_module()
    assert exported.out_avals[0].shape == (M, N)
