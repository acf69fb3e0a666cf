"""Pallas TPU flash attention in TPU interpret mode against the float32 jnp reference.

Interpret mode spends its time compiling, not running, so each case builds one jitted
forward + vjp at XLA optimisation level 0, on tiny shapes with small blocks that leave
``T`` and ``S`` off the block grid.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention as attn
from kernels.attention import reference, tpu
from tests.helpers import TOLERANCE

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
GRAD_TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (B, T, N, H), jnp.float32)
    return q, k, v, ct


def _out_and_grads(fn, q, k, v, ct, compiler_options=None):
    def f(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(f, compiler_options=compiler_options)(q, k, v, ct)


def _check(opts, q, k, v, ct, block_sizes, dtype):
    kernel = functools.partial(tpu.flash_attention, **opts, block_sizes=block_sizes, interpret=True)
    ref = functools.partial(attn.attention, **opts, impl="reference")
    out, grads = _out_and_grads(kernel, q, k, v, ct, _FAST_COMPILE)
    out_ref, grads_ref = _out_and_grads(ref, q, k, v, ct)
    assert out.dtype == q.dtype
    f32 = lambda a: np.asarray(a, np.float32)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(f32(out), f32(out_ref), atol=tol, rtol=tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        tol = GRAD_TOL[dtype]
        np.testing.assert_allclose(f32(g), f32(g_ref), atol=tol, rtol=tol, err_msg=f"d{name}")


B32 = tpu.BlockSizes(block_q=32, block_kv=32)
CASES = {
    # name: (T, S, N, K, causal, window, lengths, softcap, scale, block_sizes); B = 2 with
    # lengths, else 1.
    "mha_causal": (50, 50, 2, 2, True, None, None, None, None, B32),
    "gqa_lengths": (37, 50, 4, 2, True, None, (50, 23), None, None, B32),
    "mqa_window": (45, 70, 4, 1, True, 20, None, None, None, B32),
    "noncausal_empty_row": (30, 45, 2, 1, False, None, (0, 29), None, None, tpu.BlockSizes(16, 32)),
    "noncausal_window_scale": (20, 40, 2, 2, False, 6, None, None, 0.3, tpu.BlockSizes(32, 16)),
    "softcap_window_lengths": (33, 41, 4, 2, True, 7, (41, 18), 5.0, None, B32),
    "cross_chunk": (5, 60, 4, 2, True, None, (60, 37), None, None, tpu.BlockSizes(8, 32)),
    "own_dkv_blocks": (
        40,
        52,
        4,
        2,
        True,
        20,
        (52, 30),
        None,
        None,
        tpu.BlockSizes(32, 32, 16, 16),
    ),
    "default_blocks": (100, 100, 2, 1, True, None, None, None, None, None),
}


def _run_case(name, dtype, H=64):
    T, S, N, K, causal, window, lengths, softcap, scale, block_sizes = CASES[name]
    B = 1 if lengths is None else len(lengths)
    q, k, v, ct = _inputs(B, T, S, N, K, H, jnp.dtype(dtype))
    opts = dict(
        causal=causal,
        sliding_window=window,
        softcap=softcap,
        scale=scale,
        lengths=None if lengths is None else jnp.array(lengths, jnp.int32),
    )
    _check(opts, q, k, v, ct, block_sizes, dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads_float32(name):
    _run_case(name, "float32")


@pytest.mark.parametrize(
    "name", ["gqa_lengths", pytest.param("softcap_window_lengths", marks=pytest.mark.slow)]
)
def test_forward_and_grads_bfloat16(name):
    _run_case(name, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("H", [128, 256])
def test_large_head_dims(H):
    _run_case("own_dkv_blocks", "float32", H=H)


def _visited_by_mask(kv_len, T, S, bq, bk, causal, window):
    """Brute force: ``[B, num_q_blocks, num_kv_blocks]`` tiles holding any visible pair."""
    q_pos = np.broadcast_to(S - T + np.arange(T), (len(kv_len), T))
    mask = np.asarray(
        reference.key_mask(
            jnp.asarray(q_pos, jnp.int32),
            jnp.asarray(kv_len, jnp.int32),
            S,
            causal=causal,
            sliding_window=window,
        )
    )
    B, nq, nk = len(kv_len), -(-T // bq), -(-S // bk)
    padded = np.zeros((B, nq * bq, nk * bk), bool)
    padded[:, :T, :S] = mask
    return padded.reshape(B, nq, bq, nk, bk).any(axis=(2, 4))


def _as_ranges(first, count, n):
    """``[B, rows]`` first/count -> ``[B, rows, n]`` boolean visit table."""
    idx = np.arange(n)
    first, count = np.asarray(first)[..., None], np.asarray(count)[..., None]
    return (idx >= first) & (idx < first + count)


@pytest.mark.parametrize(
    "T,S,bq,bk,causal,window,kv_len",
    [
        (64, 64, 16, 16, True, None, (64, 64)),
        (64, 64, 16, 8, True, 12, (64, 40)),
        (37, 50, 16, 16, True, None, (50, 23)),
        (5, 60, 8, 16, True, 20, (60, 0)),
        (30, 45, 8, 16, False, None, (45, 17)),
        (30, 45, 16, 8, False, 9, (33, 45)),
    ],
)
def test_block_ranges_are_exactly_the_visible_tiles(T, S, bq, bk, causal, window, kv_len):
    kv_len = np.array(kv_len, np.int32)
    kw = dict(T=T, S=S, block_q=bq, block_kv=bk, causal=causal, sliding_window=window)
    want = _visited_by_mask(kv_len, T, S, bq, bk, causal, window)
    first, count = tpu.kv_block_ranges(kv_len, **kw)
    np.testing.assert_array_equal(_as_ranges(first, count, want.shape[2]), want)
    first, count = tpu.q_block_ranges(kv_len, **kw)
    got = _as_ranges(first, count, want.shape[1]).transpose(0, 2, 1)
    np.testing.assert_array_equal(got, want)


def test_causal_visits_the_lower_triangle():
    kw = dict(T=64, S=64, block_q=16, block_kv=16, causal=True, sliding_window=None)
    _, count = tpu.kv_block_ranges(np.array([64], np.int32), **kw)
    assert int(count.sum()) == 4 * 5 // 2  # of 16 tiles
    assert tpu.static_num_steps(tpu.kv_block_ranges, **kw) == 4


def test_skipped_blocks_are_never_read():
    """NaN keys/values in tiles no query may see leave outputs and gradients finite."""
    T, S, bq, bk, window = 16, 64, 8, 16, 10
    kv_len = jnp.array([64, 30], jnp.int32)
    q, k, v, ct = _inputs(2, T, S, 2, 1, 64, jnp.float32, seed=3)
    # Queries sit at 48..63, so with w = 10 keys below 39 (blocks 0, 1) are invisible to all;
    # sequence 1 keeps 30 keys, so its blocks 2 and 3 lie past the length.
    s = np.arange(S)
    poison = np.zeros((2, S), bool)
    poison[0] = s < 32
    poison[1] = True
    nan = jnp.asarray(poison)[:, :, None, None]
    k_bad, v_bad = jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v)
    opts = dict(causal=True, sliding_window=window, lengths=kv_len)
    kernel = functools.partial(
        tpu.flash_attention, **opts, block_sizes=tpu.BlockSizes(bq, bk), interpret=True
    )
    out, (dq, dk, dv) = _out_and_grads(kernel, q, k_bad, v_bad, ct, _FAST_COMPILE)
    out_ref, (dq_ref, dk_ref, dv_ref) = _out_and_grads(
        functools.partial(attn.attention, **opts, impl="reference"), q, k, v, ct
    )
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dq, dq_ref, atol=1e-4, rtol=1e-4)
    keep = ~np.asarray(nan)
    np.testing.assert_allclose(np.where(keep, dk, 0), dk_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.where(keep, dv, 0), dv_ref, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(out[1]) == 0)  # sequence 1: every query's window is past its length


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(block_q=12),
        dict(block_kv=0),
        dict(block_q_dkv=-8),
        dict(block_kv_dkv=20),
        dict(block_q=16.0),
    ],
)
def test_block_sizes_validation(kwargs):
    with pytest.raises(ValueError, match="multiple of 8"):
        tpu.BlockSizes(**kwargs)


def test_block_sizes_defaults():
    bs = tpu.BlockSizes(block_q=32, block_kv=64)
    assert (bs.block_q_dkv, bs.block_kv_dkv) == (32, 64)
    for_shape = tpu.BlockSizes.for_shape
    assert for_shape(T=4096, S=4096, G=1, H=128, dtype=jnp.bfloat16) == tpu.BlockSizes(256, 512)
    assert for_shape(T=4096, S=4096, G=8, H=128, dtype=jnp.bfloat16) == tpu.BlockSizes(128, 512)
    assert for_shape(T=100, S=4096, G=8, H=256, dtype=jnp.float32) == tpu.BlockSizes(128, 256)
    assert for_shape(T=4096, S=4096, G=32, H=128, dtype=jnp.bfloat16) == tpu.BlockSizes(128, 128)
    assert for_shape(T=100, S=200, G=1, H=64, dtype=jnp.float32) == tpu.BlockSizes(128, 256)


def test_input_validation():
    f = functools.partial(tpu.flash_attention, interpret=True)
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
    with pytest.raises(ValueError, match="N % K"):
        jax.eval_shape(f, shape(1, 8, 3, 64), shape(1, 8, 2, 64), shape(1, 8, 2, 64))
    with pytest.raises(ValueError, match="T=9 > S=8"):
        jax.eval_shape(f, shape(1, 9, 2, 64), shape(1, 8, 1, 64), shape(1, 8, 1, 64))


@pytest.mark.parametrize("dtype,H", [("bfloat16", 128), ("float32", 256)])
def test_lowers_to_mosaic(dtype, H):
    """Forward and both backward kernels lower to Mosaic TPU custom calls (no TPU needed)."""
    q = jax.ShapeDtypeStruct((2, 300, 8, H), jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((2, 700, 2, H), jnp.dtype(dtype))
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    attend = functools.partial(tpu.flash_attention, sliding_window=256, softcap=30.0)
    loss = lambda q, k, v, n: jnp.sum(attend(q, k, v, lengths=n).astype(jnp.float32))
    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, lengths)
    hlo = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert hlo.count("tpu_custom_call") == 3
