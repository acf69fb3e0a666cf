"""The Pallas TPU decode-attention kernel, in TPU interpret mode, against the jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import decode_attention as reference_decode
from kernels.attention import tpu_decode
from kernels.attention.tpu_decode import DecodeBlockSizes

ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(B, S, N, K, H, dtype, seed=0):
    # numpy draws: jax.random would compile a sampler per shape, slower than the checks here.
    rng = np.random.default_rng(seed)
    shapes = ((B, N, H), (B, S, K, H), (B, S, K, H))
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def _reference(q, k, v, lengths, **kw):
    return reference_decode(q, k, v, lengths, impl="reference", **kw)


# Each case packs ragged lengths (1, S, in between, and 0 = nothing visible) into the batch.
# S is never a multiple of block_s, so the last block is partial.
CASES = {
    # name: (S, N, K, H, dtype, lengths, sliding_window, softcap, block_sizes)
    "mha_h128_p2": (40, 2, 2, 128, jnp.float32, [1, 40, 23], None, None, (16, 2, 1)),
    "gqa_h64_window_p3": (37, 8, 2, 64, jnp.float32, [37, 1, 20, 0], 7, None, (8, 3, 2)),
    "mqa_h128_softcap": (45, 4, 1, 128, jnp.float32, [45, 2, 30], None, 5.0, (8, 1, 1)),
    "gqa_h128_window_softcap_p4": (50, 8, 2, 128, jnp.float32, [50, 9, 1], 12, 3.0, (8, 4, 1)),
    "gqa_h128_bf16_window": (40, 8, 2, 128, jnp.bfloat16, [40, 1, 17], 20, None, (16, 2, 1)),
    "mha_h64_bf16_default_sizes": (24, 4, 4, 64, jnp.bfloat16, [24, 3], None, 4.0, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    S, N, K, H, dtype, lengths, window, softcap, sizes = CASES[name]
    lengths = jnp.asarray(lengths, jnp.int32)
    q, k, v = _inputs(len(lengths), S, N, K, H, dtype)
    block_sizes = None if sizes is None else DecodeBlockSizes(*sizes)
    out = tpu_decode.decode_attention(
        q,
        k,
        v,
        lengths,
        sliding_window=window,
        softcap=softcap,
        block_sizes=block_sizes,
        interpret=True,
    )
    ref = _reference(q, k, v, lengths, sliding_window=window, softcap=softcap)
    assert out.shape == (len(lengths), N, H) and out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=ATOL[dtype], rtol=0
    )
    if 0 in lengths.tolist():
        assert not np.any(np.asarray(out)[lengths.tolist().index(0)])


def test_invisible_cache_entries_never_reach_the_output():
    """NaN past the lengths and inf before the window start: the output stays exact."""
    S, N, K, H, dtype, _, w, softcap, sizes = CASES["gqa_h128_window_softcap_p4"]  # compiled
    lengths = jnp.asarray([50, 13, 30], jnp.int32)
    q, k, v = _inputs(3, S, N, K, H, dtype, seed=1)
    s_1S11 = np.arange(S)[None, :, None, None]
    len_B111 = np.asarray(lengths)[:, None, None, None]
    poison = np.where(s_1S11 >= len_B111, np.nan, np.where(s_1S11 < len_B111 - w, np.inf, 0))
    out = tpu_decode.decode_attention(
        q,
        jnp.asarray(np.asarray(k) + poison, dtype),
        jnp.asarray(np.asarray(v) + poison, dtype),
        lengths,
        sliding_window=w,
        softcap=softcap,
        block_sizes=DecodeBlockSizes(*sizes),
        interpret=True,
    )
    ref = _reference(q, k, v, lengths, sliding_window=w, softcap=softcap)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL[dtype], rtol=0)


def test_int8_cache_matches_reference_on_dequantised_cache():
    """Per-token-per-head scales; NaN/inf scales past the lengths must not leak."""
    B, S, N, K, H, w = 3, 70, 8, 2, 64, 20
    lengths = np.array([70, 1, 33])
    rng = np.random.default_rng(2)
    q = rng.standard_normal((B, N, H), np.float32)

    def quantize(x_BSKH):
        scale_BSK = np.abs(x_BSKH).max(-1) / 127
        return np.round(x_BSKH / scale_BSK[..., None]).astype(np.int8), scale_BSK

    k8, ks = quantize(rng.standard_normal((B, S, K, H), np.float32))
    v8, vs = quantize(rng.standard_normal((B, S, K, H), np.float32))
    ks_poisoned, vs_poisoned = ks.copy(), vs.copy()
    for b, length in enumerate(lengths):
        ks_poisoned[b, length:], vs_poisoned[b, length:] = np.nan, np.inf
    out = tpu_decode.decode_attention_int8(
        jnp.asarray(q),
        jnp.asarray(k8),
        jnp.asarray(v8),
        jnp.asarray(ks_poisoned),
        jnp.asarray(vs_poisoned),
        jnp.asarray(lengths),
        sliding_window=w,
        softcap=4.0,
        block_sizes=DecodeBlockSizes(32, 2, 2),
        interpret=True,
    )
    k, v = (jnp.asarray(x * s[..., None]) for x, s in ((k8, ks), (v8, vs)))
    ref = _reference(jnp.asarray(q), k, v, jnp.asarray(lengths), sliding_window=w, softcap=4.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "B, S, N, K, H, dtype, window, softcap",
    [
        (2, 1000, 8, 2, 128, jnp.bfloat16, None, None),
        (2, 1000, 8, 2, 64, jnp.float32, 128, 30.0),
        (2, 500, 8, 2, 128, jnp.int8, 64, None),
    ],
)
def test_lowers_to_mosaic(B, S, N, K, H, dtype, window, softcap):
    """Cross-lowering for TPU on CPU runs the Pallas->Mosaic rules and block-shape checks."""
    spec = jax.ShapeDtypeStruct
    kv = spec((B, S, K, H), dtype)
    kw = dict(sliding_window=window, softcap=softcap)
    if dtype == jnp.int8:
        scales = spec((B, S, K), jnp.float32)
        args = (spec((B, N, H), jnp.bfloat16), kv, kv, scales, scales, spec((B,), jnp.int32))
        fn = functools.partial(tpu_decode.decode_attention_int8, **kw)
    else:
        args = (spec((B, N, H), dtype), kv, kv, spec((B,), jnp.int32))
        fn = functools.partial(tpu_decode.decode_attention, **kw)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("num_partitions", [1, 3, 8])
def test_only_visible_blocks_are_fetched_and_computed(window, num_partitions):
    """Walks the grid through the kernel's block schedule (the index_map and the pl.when)."""
    S, block_s = 70, 8
    num_blocks = -(-S // block_s)
    steps = -(-num_blocks // num_partitions)
    lengths = np.array([0, 1, 8, 9, 33, 64, 70])
    bounds = tpu_decode.visible_bounds(jnp.asarray(lengths), S, window)
    b, p, i = np.meshgrid(
        np.arange(len(lengths)), np.arange(num_partitions), np.arange(steps), indexing="ij"
    )
    static = dict(block_s=block_s, num_partitions=num_partitions, num_blocks=num_blocks)
    j, valid = jax.jit(functools.partial(tpu_decode._kv_block, **static))(bounds, b, p, i)
    j, valid = np.asarray(j), np.asarray(valid)
    assert j.min() >= 0 and j.max() < num_blocks
    for bb, length in enumerate(lengths):
        start = 0 if window is None else max(0, length - window)
        visible = set(range(start // block_s, -(-length // block_s))) if length > start else set()
        computed = j[bb][valid[bb]].tolist()
        assert sorted(computed) == sorted(visible)  # each visible block exactly once
        # The pipeline fetches a block when its index changes between consecutive steps.
        sweep = j[bb].reshape(-1)
        assert int(np.sum(sweep[1:] != sweep[:-1])) + 1 == max(len(visible), 1)
        assert not visible or set(sweep.tolist()) == visible


def test_default_block_sizes():
    f32 = DecodeBlockSizes.default(B=1, S=32768, K=8, H=128, dtype=jnp.float32)
    assert f32 == DecodeBlockSizes(block_s=512, num_partitions=1, kv_heads_per_block=1)
    bf16 = DecodeBlockSizes.default(B=1, S=32768, K=1, H=128, dtype=jnp.bfloat16)
    assert bf16 == DecodeBlockSizes(block_s=1024, num_partitions=4, kv_heads_per_block=1)
    h64 = DecodeBlockSizes.default(B=16, S=20, K=4, H=64, dtype=jnp.bfloat16)
    assert h64 == DecodeBlockSizes(block_s=32, num_partitions=1, kv_heads_per_block=2)
    odd = DecodeBlockSizes.default(B=2, S=100, K=3, H=64, dtype=jnp.float32)
    assert odd.kv_heads_per_block == 3 and odd.block_s == 104


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_s=12), "multiple of 8"),
        (dict(block_s=0), "multiple of 8"),
        (dict(block_s=8, num_partitions=0), "num_partitions"),
        (dict(block_s=8, kv_heads_per_block=0), "kv_heads_per_block"),
    ],
)
def test_block_size_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeBlockSizes(**kwargs)


@pytest.mark.parametrize(
    "sizes, K, H, dtype, match",
    [
        ((8, 1, 3), 4, 128, jnp.float32, "does not divide K=4"),
        ((8, 1, 1), 4, 64, jnp.float32, "multiple of 128"),
        ((8, 1, 1), 2, 128, jnp.bfloat16, "multiple of 16 for a bfloat16"),
        ((16, 1, 1), 2, 128, jnp.int8, "multiple of 32 for a int8"),
    ],
)
def test_block_size_shape_errors(sizes, K, H, dtype, match):
    with pytest.raises(ValueError, match=match):
        DecodeBlockSizes(*sizes).check(K=K, H=H, dtype=dtype)
    q, k, v = _inputs(1, 16, K, K, H, dtype)
    kw = dict(block_sizes=DecodeBlockSizes(*sizes), interpret=True)
    with pytest.raises(ValueError, match=match):
        if dtype == jnp.int8:
            ones = jnp.ones(k.shape[:3])
            q = q.astype(jnp.float32)
            tpu_decode.decode_attention_int8(q, k, v, ones, ones, jnp.array([16]), **kw)
        else:
            tpu_decode.decode_attention(q, k, v, jnp.array([16]), **kw)
