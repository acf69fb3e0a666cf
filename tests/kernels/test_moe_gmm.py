"""Pallas grouped matmuls in interpret mode against ``jax.lax.ragged_dot``.

TPU kernels (TPU interpret mode): forward and gradients wrt ``x`` and ``w`` (``jax.vjp`` with a
random cotangent) on tiny shapes with ``(8, 128, 128)`` tiles that leave ``M``, ``K`` and ``N``
off the block grid and put group boundaries inside row tiles; each case compiles once at XLA
optimisation level 0. GPU kernel (Mosaic GPU interpret mode, where wgmmas are float32
``dot_general``s): the same checks on fewer cases, and cross-lowering for CUDA on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import moe
from kernels.moe import gpu, tpu
from tests.helpers import TOLERANCE

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
SMALL = tpu.BlockSizes(tm=8, tk=128, tn=128)


def _ragged_dot(x, w, group_sizes):
    out = jax.lax.ragged_dot(
        x, w, group_sizes, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    return out.astype(x.dtype)


def _assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = TOLERANCE[jnp.dtype(dtype).name]
    # Accumulation error scales with the output, so atol is relative to its largest entry.
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1.0))


CASES = {
    # name: (group_sizes, M, K, N, dtype, block_sizes)
    "middle_empty_tail_rows": ((10, 0, 13, 9), 40, 200, 130, "float32", SMALL),
    "first_last_empty_bf16": ((0, 12, 20, 0), 32, 128, 128, "bfloat16", SMALL),
    "all_rows_one_group": ((0, 21, 0), 21, 100, 100, "float32", SMALL),
    "one_group_e1": ((19,), 19, 64, 120, "float32", SMALL),
    "default_blocks_bf16": ((5, 30, 0, 7), 45, 96, 160, "bfloat16", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_ragged_dot(name):
    sizes, M, K, N, dtype, block_sizes = CASES[name]
    _check_against_ragged_dot(tpu.grouped_matmul, sizes, M, K, N, dtype, block_sizes)


def _check_against_ragged_dot(grouped_matmul, sizes, M, K, N, dtype, block_sizes):
    dtype = jnp.dtype(dtype)
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(sizes), K, N), jnp.float32).astype(dtype)
    dy = jax.random.normal(kd, (M, N), jnp.float32).astype(dtype)
    group_sizes = jnp.array(sizes, jnp.int32)
    total = sum(sizes)
    # Rows past the groups are never read: non-finite values there must not leak.
    x_dirty = x.at[total:].set(jnp.inf)

    def kernel(x, w, dy):
        f = functools.partial(
            grouped_matmul, group_sizes_E=group_sizes, block_sizes=block_sizes, interpret=True
        )
        out, vjp = jax.vjp(f, x, w)
        return out, *vjp(dy)

    out, dx, dw = jax.jit(kernel, compiler_options=_FAST_COMPILE)(x_dirty, w, dy)
    want, vjp = jax.vjp(lambda x, w: _ragged_dot(x, w, group_sizes), x, w)
    want_dx, want_dw = vjp(dy)
    _assert_close(out, want, dtype)
    _assert_close(dx, want_dx, dtype)
    _assert_close(dw, want_dw, dtype)
    assert not np.asarray(out[total:], np.float32).any()
    assert not np.asarray(dx[total:], np.float32).any()
    for e, size in enumerate(sizes):
        if size == 0:  # exactly zero, not merely close
            assert not np.asarray(dw[e], np.float32).any()


def test_no_rows_in_any_group():
    x, w = jnp.ones((16, 128)), jnp.ones((2, 128, 128))
    group_sizes = jnp.zeros((2,), jnp.int32)
    f = functools.partial(tpu.grouped_matmul, block_sizes=SMALL, interpret=True)

    def kernel(x, w):
        out, vjp = jax.vjp(lambda x, w: f(x, w, group_sizes), x, w)
        return out, *vjp(jnp.ones_like(out))

    out, dx, dw = jax.jit(kernel, compiler_options=_FAST_COMPILE)(x, w)
    assert not np.asarray(out).any() and not np.asarray(dx).any() and not np.asarray(dw).any()


def _rows_of_groups(sizes):
    """The (group, row) pairs of the grouped rows, from a plain loop."""
    pairs, row = set(), 0
    for e, size in enumerate(sizes):
        pairs |= {(e, r) for r in range(row, row + size)}
        row += size
    return pairs


@pytest.mark.parametrize("by_group", [False, True])
def test_visits_cover_each_grouped_row_once(by_group):
    rng = np.random.default_rng(0)
    tm, M = 8, 61
    num_tiles = -(-M // tm)
    visits = jax.jit(
        functools.partial(tpu.make_visits, M=M, tm=tm, num_tiles=num_tiles, by_group=by_group)
    )
    for _ in range(10):
        E = int(rng.choice([1, 3, 6]))  # few shapes: one compile each
        sizes = rng.multinomial(int(rng.integers(0, M + 1)), np.ones(E) / E)
        sizes[rng.random(E) < 0.3] = 0
        meta = jax.tree.map(np.asarray, visits(jnp.asarray(sizes, jnp.int32)))
        assert meta.tile.shape == (num_tiles + E - 1,)
        compute = (meta.flags & tpu._COMPUTE) != 0
        covered = [
            (int(g), int(t) * tm + r)
            for t, g, lo, hi in zip(meta.tile, meta.group, meta.lo, meta.hi, strict=True)
            for r in range(lo, hi)
        ]
        assert len(covered) == len(set(covered))
        assert set(covered) == _rows_of_groups(sizes)
        assert (meta.data_tile[compute] == meta.tile[compute]).all()
        # Each output block (row tile / group) is written exactly once.
        key = meta.group if by_group else meta.tile
        written = key[(meta.flags & tpu._LAST) != 0]
        want = np.arange(E) if by_group else np.arange(num_tiles)
        np.testing.assert_array_equal(np.sort(written), want)


def test_dispatcher_routes_to_the_kernel(monkeypatch):
    x, w = jnp.ones((12, 64)), jnp.ones((2, 64, 32))
    group_sizes = jnp.array([5, 7], jnp.int32)
    calls = []
    kernel = tpu.grouped_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(tpu, "grouped_matmul", spy)
    out = moe.grouped_matmul(x, w, group_sizes, impl="pallas_tpu", interpret=True)
    assert calls == [dict(block_sizes=None, interpret=True)]
    np.testing.assert_allclose(out, _ragged_dot(x, w, group_sizes), rtol=1e-5)
    moe.grouped_matmul(x, w, group_sizes, impl="auto", interpret=True)
    assert len(calls) == 1  # auto is xla off TPU


GPU_CASES = {
    # name: (group_sizes, M, K, N, dtype, block_sizes)
    "boundaries_empty_tail": (
        (50, 0, 43, 0, 39),
        150,
        100,
        130,
        "float32",
        gpu.BlockSizes(64, 64, 64, 2),
    ),
    "default_blocks_bf16": ((0, 70, 20), 96, 64, 64, "bfloat16", None),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_forward_and_gradients_match_ragged_dot(name):
    sizes, M, K, N, dtype, block_sizes = GPU_CASES[name]
    _check_against_ragged_dot(gpu.grouped_matmul, sizes, M, K, N, dtype, block_sizes)


@pytest.mark.parametrize("block_sizes", [None, gpu.BlockSizes(64, 128, 64, 4)])
def test_gpu_lowers_to_mosaic_gpu(block_sizes):
    """Cross-lowering for CUDA on CPU runs the Pallas->Mosaic GPU rules (wgmma from SMEM, the
    transposed B operand of dx, TMA, register layouts) for both row-tile heights."""
    x, w, sizes = (
        _shape(4096, 1024, dtype=jnp.bfloat16),
        _shape(8, 1024, 2816, dtype=jnp.bfloat16),
        _shape(8, dtype=jnp.int32),
    )
    f = functools.partial(gpu.grouped_matmul, block_sizes=block_sizes)

    def fwd_bwd(x, w, sizes):
        out, vjp = jax.vjp(lambda x, w: f(x, w, sizes), x, w)
        return out, *vjp(out)

    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"])(x, w, sizes)
    mlir = exported.mlir_module().splitlines()
    assert len([line for line in mlir if "custom_call @mosaic_gpu" in line]) == 2  # fwd, dx
    shapes = [a.shape for a in exported.out_avals]
    assert shapes == [(4096, 2816), (4096, 1024), (8, 1024, 2816)]


def test_gpu_refuses_float32_and_bad_blocks():
    x, w, sizes = jnp.ones((8, 64)), jnp.ones((2, 64, 64)), jnp.array([4, 4])
    with pytest.raises(ValueError, match="needs float16 or bfloat16"):
        gpu.grouped_matmul(x, w, sizes)
    with pytest.raises(ValueError, match="block_m must be 64 or 128"):
        gpu.BlockSizes(block_m=32)
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 64"):
        gpu.BlockSizes(block_k=96)
    with pytest.raises(ValueError, match="bytes of SMEM"):
        bf16 = (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sizes)
        gpu.grouped_matmul(*bf16, block_sizes=gpu.BlockSizes(128, 256, 256, 4))


def _shape(*dims, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(dims, dtype)


@pytest.mark.parametrize(
    "x,w,sizes,impl,message",
    [
        (_shape(4, 8, 2), _shape(2, 2, 3), _shape(2, dtype=jnp.int32), "xla", r"x \[M, K\]"),
        (_shape(4, 8), _shape(8, 3), _shape(2, dtype=jnp.int32), "xla", r"w \[E, K, N\]"),
        (_shape(4, 8), _shape(2, 7, 3), _shape(2, dtype=jnp.int32), "xla", "K=8.*K=7"),
        (_shape(4, 8), _shape(2, 8, 3), _shape(3, dtype=jnp.int32), "xla", r"shape \(2,\)"),
        (_shape(4, 8), _shape(2, 8, 3), _shape(2), "xla", "must be integers, got float32"),
        (_shape(4, 8), _shape(2, 8, 3), _shape(2, dtype=jnp.int32), "mosaic", "unknown"),
        (_shape(4, 8), _shape(2, 8, 3), _shape(2, dtype=jnp.int32), "pallas_gpu", "needs a GPU"),
        (_shape(4, 8), _shape(2, 8, 3), _shape(2, dtype=jnp.int32), "pallas_tpu", "needs a TPU"),
    ],
)
def test_errors_name_the_problem(x, w, sizes, impl, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(functools.partial(moe.grouped_matmul, impl=impl), x, w, sizes)


def test_unknown_impls_list_the_valid_ones():
    args = (_shape(4, 8), _shape(2, 8, 3), _shape(2, dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"'auto', 'reference', 'xla', 'pallas_tpu', 'pallas_gpu'"):
        jax.eval_shape(functools.partial(moe.grouped_matmul, impl="mosaic"), *args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tm=12), "tm must be a positive multiple of 8"),
        (dict(tm=0), "tm must be a positive multiple of 8"),
        (dict(tk=64), "tk must be a positive multiple of 128"),
        (dict(tn=200), "tn must be a positive multiple of 128"),
        (dict(tn=256.0), "tn must be a positive multiple of 128"),
    ],
)
def test_block_sizes_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tpu.BlockSizes(**kwargs)


def test_block_sizes_defaults():
    for_shape = tpu.BlockSizes.for_shape
    # Mixtral (E8) and fine-grained (E64) up-projections: 256 rows balance the weight
    # bytes of small tiles against the boundary visits of large ones.
    assert for_shape(16384, 4096, 14336, 8, jnp.bfloat16) == tpu.BlockSizes(256, 512, 1024)
    assert for_shape(49152, 2048, 1408, 64, jnp.bfloat16) == tpu.BlockSizes(256, 512, 1024)
    assert for_shape(4096, 4096, 4096, 1, jnp.bfloat16) == tpu.BlockSizes(512, 512, 1024)
    assert for_shape(512, 768, 300, 64, jnp.bfloat16) == tpu.BlockSizes(128, 512, 384)
    assert for_shape(5, 300, 200, 8, jnp.bfloat16) == tpu.BlockSizes(16, 384, 256)
    assert for_shape(5, 300, 200, 8, jnp.float32) == tpu.BlockSizes(8, 384, 256)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lowers_to_mosaic(dtype):
    """Forward and both backward kernels lower to Mosaic TPU custom calls (no TPU needed)."""
    x = _shape(4096, 1024, dtype=jnp.dtype(dtype))
    w = _shape(8, 1024, 2816, dtype=jnp.dtype(dtype))
    sizes = _shape(8, dtype=jnp.int32)

    def loss(x, w, sizes):
        return jnp.sum(tpu.grouped_matmul(x, w, sizes).astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w, sizes)
    hlo = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert hlo.count("tpu_custom_call") == 3


@pytest.mark.parametrize(
    ("backend", "hopper", "dtype", "want"),
    [
        ("tpu", False, jnp.float32, "pallas_tpu"),
        ("gpu", True, jnp.bfloat16, "pallas_gpu"),
        ("gpu", True, jnp.float32, "xla"),
        ("gpu", False, jnp.bfloat16, "xla"),
        ("cpu", False, jnp.bfloat16, "xla"),
    ],
)
def test_auto_picks_the_measured_winner(monkeypatch, backend, hopper, dtype, want):
    import kernels.attention
    import kernels.moe

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(kernels.attention, "_is_hopper", lambda: hopper)
    assert kernels.moe._auto(dtype) == want
