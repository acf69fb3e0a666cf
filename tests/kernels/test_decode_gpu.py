"""The Pallas Mosaic GPU decode-attention kernel, in GPU interpret mode, against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import decode_attention as reference_decode
from kernels.attention import gpu_decode
from kernels.attention.gpu_decode import DecodeBlockSizes

ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(B, S, N, K, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, N, H), (B, S, K, H), (B, S, K, H))
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def _reference(q, k, v, lengths, **kw):
    return reference_decode(q, k, v, lengths, impl="reference", **kw)


# Each case packs ragged lengths (1, S, in between, and 0 = nothing visible) into the batch.
# S is never a multiple of block_s, so the last tile is partial (read as NaN in interpret mode).
CASES = {
    # name: (S, N, K, H, dtype, lengths, sliding_window, softcap, block_sizes)
    "mha_h128_p2": (150, 2, 2, 128, jnp.float32, [1, 150, 70], None, None, (64, 2, 2)),
    "gqa_h64_window_p3": (200, 8, 2, 64, jnp.float32, [200, 1, 130, 0], 70, None, (64, 3, 2)),
    "mqa_h128_softcap_3stages": (300, 4, 1, 128, jnp.float32, [300, 2, 129], None, 5.0, (64, 1, 3)),
    "gqa_h64_bf16_window_softcap": (150, 8, 2, 64, jnp.bfloat16, [150, 9, 1], 90, 3.0, (64, 2, 2)),
    "gqa_h128_bf16_block128": (
        300,
        8,
        2,
        128,
        jnp.bfloat16,
        [300, 1, 170],
        None,
        None,
        (128, 2, 2),
    ),
    "mha_h64_bf16_default_sizes": (40, 4, 4, 64, jnp.bfloat16, [40, 3], None, 4.0, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    S, N, K, H, dtype, lengths, window, softcap, sizes = CASES[name]
    lengths = jnp.asarray(lengths, jnp.int32)
    q, k, v = _inputs(len(lengths), S, N, K, H, dtype)
    block_sizes = None if sizes is None else DecodeBlockSizes(*sizes)
    kw = dict(sliding_window=window, softcap=softcap)
    out = gpu_decode.decode_attention(
        q, k, v, lengths, block_sizes=block_sizes, interpret=True, **kw
    )
    ref = _reference(q, k, v, lengths, **kw)
    assert out.shape == (len(lengths), N, H) and out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=ATOL[dtype], rtol=0
    )
    if 0 in lengths.tolist():
        assert not np.any(np.asarray(out)[lengths.tolist().index(0)])


def test_invisible_cache_entries_never_reach_the_output():
    """NaN past the lengths and inf before the window start: the output stays exact."""
    S, N, K, H, w, softcap = 150, 4, 2, 64, 70, 3.0
    lengths = jnp.asarray([150, 13, 100], jnp.int32)
    q, k, v = _inputs(3, S, N, K, H, jnp.float32, seed=1)
    s_1S11 = np.arange(S)[None, :, None, None]
    len_B111 = np.asarray(lengths)[:, None, None, None]
    poison = np.where(s_1S11 >= len_B111, np.nan, np.where(s_1S11 < len_B111 - w, np.inf, 0))
    out = gpu_decode.decode_attention(
        q,
        jnp.asarray(np.asarray(k) + poison),
        jnp.asarray(np.asarray(v) + poison),
        lengths,
        sliding_window=w,
        softcap=softcap,
        block_sizes=DecodeBlockSizes(64, 2, 2),
        interpret=True,
    )
    ref = _reference(q, k, v, lengths, sliding_window=w, softcap=softcap)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_default_block_sizes():
    bf16 = DecodeBlockSizes.default(B=1, S=32768, K=8, H=128, dtype=jnp.bfloat16)
    assert bf16 == DecodeBlockSizes(block_s=128, num_partitions=17, num_stages=2)
    f32 = DecodeBlockSizes.default(B=64, S=4096, K=8, H=128, dtype=jnp.float32)
    assert f32 == DecodeBlockSizes(block_s=64, num_partitions=1, num_stages=2)
    h64 = DecodeBlockSizes.default(B=2, S=20, K=4, H=64, dtype=jnp.bfloat16)
    assert h64.block_s == 64 and h64.num_partitions == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_s=96), "multiple of 64"),
        (dict(block_s=0), "multiple of 64"),
        (dict(block_s=512), "<= 256"),
        (dict(block_s=64, num_partitions=0), "num_partitions"),
        (dict(block_s=64, num_stages=0), "num_stages"),
    ],
)
def test_block_size_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeBlockSizes(**kwargs)


@pytest.mark.parametrize(
    "B, S, N, K, H, dtype, window, softcap",
    [
        (2, 1000, 8, 2, 128, jnp.bfloat16, None, None),
        (2, 1000, 8, 8, 64, jnp.bfloat16, 128, 30.0),
        (2, 1000, 4, 1, 128, jnp.float16, None, None),
        (2, 1003, 8, 2, 64, jnp.float16, 128, 30.0),
        (2, 1000, 80, 1, 128, jnp.bfloat16, None, None),  # G = 80: two row blocks of 64
    ],
)
def test_lowers_to_mosaic_gpu(B, S, N, K, H, dtype, window, softcap):
    """Cross-lowering for CUDA on CPU runs the Pallas->Mosaic GPU rules (layouts, TMA checks)."""
    spec = jax.ShapeDtypeStruct
    kv = spec((B, S, K, H), dtype)
    args = (spec((B, N, H), dtype), kv, kv, spec((B,), jnp.int32))
    fn = functools.partial(gpu_decode.decode_attention, sliding_window=window, softcap=softcap)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()


def test_float32_needs_interpret_mode():
    q, k, v = _inputs(1, 16, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gpu_decode.decode_attention(q, k, v, jnp.array([16]))


def test_lowers_with_partitions():
    """P > 1: the kernel writes (max, sum) rows and float32 partial outputs for the combine."""
    spec = jax.ShapeDtypeStruct
    kv = spec((1, 4096, 8, 128), jnp.bfloat16)
    args = (spec((1, 32, 128), jnp.bfloat16), kv, kv, spec((1,), jnp.int32))
    fn = functools.partial(gpu_decode.decode_attention, block_sizes=DecodeBlockSizes(128, 4, 2))
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()


def test_shape_errors():
    q, k, v = _inputs(1, 16, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="N % K"):
        gpu_decode.decode_attention(q, k, v, jnp.array([16]), interpret=True)
    q, k, v = _inputs(1, 16, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="lengths_B"):
        gpu_decode.decode_attention(q, k, v, jnp.array([16.0]), interpret=True)
