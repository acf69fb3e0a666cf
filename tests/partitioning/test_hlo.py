"""``partitioning.hlo`` against closed-form collectives of small programs compiled on the 8-device
CPU mesh, and against hand-written HLO for the forms the CPU backend does not print.

What XLA CPU emits (jax 0.10): a contraction sharded over an axis with a replicated output is an
all-reduce; with the output sharded over that axis it is the same all-reduce of the full result
followed by a local dynamic-slice (no reduce-scatter: that appears only for an explicit
``psum_scatter``); a dim-0 to dim-1 reshard over one axis is one all-to-all whose operands and
results are tuples of one block per peer; bf16 collectives run in f32.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from partitioning import hlo
from partitioning.hlo import Collective

M, K, N = 16, 32, 8
F32 = 4


@pytest.fixture(scope="module")
def mesh_ab():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))


@pytest.fixture(scope="module")
def mesh_xyz():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("x", "y", "z"))


def _compile(f, mesh, *args):
    """Compiles ``f`` on ``args``: ``(shape, spec)`` or ``(shape, spec, dtype)`` triples."""
    structs = [
        jax.ShapeDtypeStruct(a[0], a[2] if len(a) > 2 else jnp.float32, sharding=_ns(mesh, a[1]))
        for a in args
    ]
    return jax.jit(f).lower(*structs).compile()


def _ns(mesh, spec):
    return NamedSharding(mesh, spec)


def _matmul_to(mesh, out_spec):
    return lambda x_MK, w_KN: jax.lax.with_sharding_constraint(x_MK @ w_KN, _ns(mesh, out_spec))


# --- compiled programs ---------------------------------------------------------------------


def test_contraction_over_b_with_replicated_output_all_reduces_over_b(mesh_ab):
    compiled = _compile(_matmul_to(mesh_ab, P()), mesh_ab, ((M, K), P(None, "b")), ((K, N), P("b")))
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("all-reduce", "f32", M * N * F32, M * N * F32, 4, ("b",))
    ]


def test_text_and_compiled_agree_and_no_mesh_gives_no_axes(mesh_ab):
    compiled = _compile(_matmul_to(mesh_ab, P()), mesh_ab, ((M, K), P(None, "b")), ((K, N), P("b")))
    assert hlo.collectives(compiled.as_text(), mesh_ab) == hlo.collectives(compiled, mesh_ab)
    (c,) = hlo.collectives(compiled)
    assert (c.kind, c.group_size, c.axes) == ("all-reduce", 4, ())


def test_gather_to_replicated_all_gathers_over_a(mesh_ab):
    f = lambda x: jax.lax.with_sharding_constraint(x * 2, _ns(mesh_ab, P()))
    compiled = _compile(f, mesh_ab, ((M, K), P("a")))
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("all-gather", "f32", M * K * F32 // 2, M * K * F32, 2, ("a",))
    ]


def test_reduce_scatter_pattern_is_an_all_reduce_on_cpu(mesh_ab):
    """Contraction over ``b`` with the output sharded over ``b``: XLA CPU all-reduces the whole
    ``[M, N]`` partial sum and slices locally (TPU and GPU fuse the pair into a reduce-scatter)."""
    compiled = _compile(
        _matmul_to(mesh_ab, P("b")), mesh_ab, ((M, K), P(None, "b")), ((K, N), P("b"))
    )
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("all-reduce", "f32", M * N * F32, M * N * F32, 4, ("b",))
    ]
    assert "dynamic-slice" in compiled.as_text()


def test_explicit_psum_scatter_is_a_reduce_scatter(mesh_ab):
    f = jax.shard_map(
        lambda x: jax.lax.psum_scatter(x, "b", scatter_dimension=0, tiled=True),
        mesh=mesh_ab,
        in_specs=P("a"),
        out_specs=P(("a", "b")),
    )
    compiled = _compile(f, mesh_ab, ((M, K), P("a")))
    local = M // 2 * K * F32
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("reduce-scatter", "f32", local, local // 4, 4, ("b",))
    ]


def test_reshard_dim0_to_dim1_is_one_all_to_all(mesh_ab):
    """XLA CPU prints it as a tuple all-to-all of 4 blocks ``[M/4, 1, K/4]``; bytes sum them."""
    f = lambda x: jax.lax.with_sharding_constraint(x * 2, _ns(mesh_ab, P(None, "b")))
    compiled = _compile(f, mesh_ab, ((M, K), P("b")))
    local = M * K * F32 // 4
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("all-to-all", "f32", local, local, 4, ("b",))
    ]


def test_bf16_collectives_run_in_f32_on_cpu(mesh_ab):
    f = lambda x: jax.lax.with_sharding_constraint(x * 2, _ns(mesh_ab, P()))
    compiled = _compile(f, mesh_ab, ((M, K), P(("a", "b")), jnp.bfloat16))
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("all-gather", "f32", M * K * F32 // 8, M * K * F32, 8, ("a", "b"))
    ]


@pytest.mark.parametrize(
    "contracted, axes",
    [(("x", "y"), ("x", "y")), (("x", "z"), ("x", "z")), (("z", "x"), ("x", "z"))],
)
def test_contraction_over_two_axes_all_reduces_over_both(mesh_xyz, contracted, axes):
    compiled = _compile(
        _matmul_to(mesh_xyz, P()), mesh_xyz, ((M, K), P(None, contracted)), ((K, N), P(contracted))
    )
    assert hlo.collectives(compiled, mesh_xyz) == [
        Collective("all-reduce", "f32", M * N * F32, M * N * F32, 4, axes)
    ]


def test_gather_over_two_axes(mesh_xyz):
    f = lambda x: jax.lax.with_sharding_constraint(x * 2, _ns(mesh_xyz, P()))
    compiled = _compile(f, mesh_xyz, ((M, K), P(("y", "x"))))
    assert hlo.collectives(compiled, mesh_xyz) == [
        Collective("all-gather", "f32", M * K * F32 // 4, M * K * F32, 4, ("x", "y"))
    ]


def test_group_ids_are_mesh_positions_not_device_ids():
    """On a mesh whose devices are permuted, groups still name flat positions in
    ``mesh.devices``: read as ``Device.id`` they would span both axes."""
    order = [3, 1, 6, 0, 7, 2, 5, 4]
    mesh = Mesh(np.array(jax.devices()[:8])[order].reshape(2, 4), ("a", "b"))
    compiled = _compile(_matmul_to(mesh, P()), mesh, ((M, K), P(None, "b")), ((K, N), P("b")))
    (c,) = hlo.collectives(compiled, mesh)
    assert c.axes == ("b",)
    groups = hlo.replica_groups(_line(compiled.as_text(), "all-reduce("), 8)
    by_device_id = [[order.index(i) for i in g] for g in groups]
    assert hlo.mesh_axes(by_device_id, mesh) == ()


def test_ring_collective_permute_over_b(mesh_ab):
    f = jax.shard_map(
        lambda x: jax.lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)]),
        mesh=mesh_ab,
        in_specs=P("a", "b"),
        out_specs=P("a", "b"),
    )
    compiled = _compile(f, mesh_ab, ((M, K), P("a", "b")))
    local = M * K * F32 // 8
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("collective-permute", "f32", local, local, 4, ("b",))
    ]


def test_collective_in_a_loop_counts_once(mesh_ab):
    def f(x):
        def body(_, x):
            x = jax.lax.with_sharding_constraint(jnp.sin(x), _ns(mesh_ab, P("a")))
            return jax.lax.with_sharding_constraint(x, _ns(mesh_ab, P()))

        return jax.lax.fori_loop(0, 3, body, x)

    compiled = _compile(f, mesh_ab, ((M, K), P()))
    assert "while(" in compiled.as_text()
    assert hlo.collectives(compiled, mesh_ab) == [
        Collective("all-gather", "f32", M * K * F32 // 2, M * K * F32, 2, ("a",))
    ]


def test_summarize_merges_identical_ops(mesh_ab):
    """Two dependent all-reduces over ``b`` (a ``sin`` between them, so XLA can neither combine
    nor fold them) and one gather over ``a``."""
    twice = jax.shard_map(
        lambda x: jax.lax.psum(jnp.sin(jax.lax.psum(x, "b")), "b"),
        mesh=mesh_ab,
        in_specs=P("a", "b"),
        out_specs=P("a"),
    )

    def f(x_MK, y_MK):
        return twice(x_MK), jax.lax.with_sharding_constraint(y_MK * 2, _ns(mesh_ab, P()))

    args = ((M, K), P("a", "b")), ((M, K), P("a"))
    cols = hlo.collectives(_compile(f, mesh_ab, *args), mesh_ab)
    local = M * K * F32 // 8
    assert len(cols) == 3
    assert hlo.summarize(cols) == [
        Collective("all-gather", "f32", M * K * F32 // 2, M * K * F32, 2, ("a",)),
        Collective("all-reduce", "f32", local, local, 4, ("b",), count=2),
    ]


def test_independent_all_reduces_are_combined_into_one_tuple_op(mesh_ab):
    def f(x_MK, w_KN, v_KN):
        out = _ns(mesh_ab, P())
        return (
            jax.lax.with_sharding_constraint(x_MK @ w_KN, out),
            jax.lax.with_sharding_constraint(x_MK @ v_KN, out),
        )

    args = ((M, K), P(None, "b")), ((K, N), P("b")), ((K, N), P("b"))
    assert hlo.collectives(_compile(f, mesh_ab, *args), mesh_ab) == [
        Collective("all-reduce", "f32", 2 * M * N * F32, 2 * M * N * F32, 4, ("b",))
    ]


# --- hand-written HLO ----------------------------------------------------------------------


def _line(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


@pytest.mark.parametrize(
    "attr, groups",
    [
        ("replica_groups={{0,4},{1,5},{2,6},{3,7}}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("replica_groups={}", [list(range(8))]),
        ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("replica_groups=[2,4]<=[2,2,2]T(1,0,2)", [[0, 1, 4, 5], [2, 3, 6, 7]]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) "
            "{'axis_1'}",
            [[0, 1, 2, 3], [4, 5, 6, 7]],
        ),
        (
            "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,2,2]T(1,0,2)) "
            "{'axis_0'}",
            [[0, 4, 2, 6], [1, 5, 3, 7]],
        ),
        ("replica_groups=mesh[a=8] {a:(2)2}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
        ("replica_groups=mesh['a'=2,'b'=4] {'b','a'}", [[0, 4, 1, 5, 2, 6, 3, 7]]),
    ],
)
def test_replica_group_forms(attr, groups):
    """Each form against its groups worked out by hand from the XLA definitions."""
    assert hlo.replica_groups(f"channel_id=1, {attr}, use_global_device_ids=true", 8) == groups


@pytest.mark.parametrize(
    "groups, axes",
    [
        ([[0, 1, 2, 3], [4, 5, 6, 7]], ("y", "z")),
        ([[0, 4], [1, 5], [2, 6], [3, 7]], ("x",)),
        ([[0, 2], [1, 3], [4, 6], [5, 7]], ("y",)),
        ([[0, 1, 4, 5], [2, 3, 6, 7]], ("x", "z")),
        ([list(range(8))], ("x", "y", "z")),
        ([[0, 3], [1, 2], [4, 7], [5, 6]], ()),  # diagonals of the (y, z) square
        ([[0, 1], [2, 3, 4, 5], [6, 7]], ()),  # groups along different axes
        ([[0], [1]], ()),
        ([[8, 9]], ()),  # not devices of this mesh
    ],
)
def test_mesh_axes(mesh_xyz, groups, axes):
    assert hlo.mesh_axes(groups, mesh_xyz) == axes


ASYNC_HLO = """\
HloModule jit_f, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

ENTRY %main.1_spmd (p0: bf16[4,32], p1: f32[16,8], p2: f32[2,8]) -> (bf16[16,32], f32[16,8]) {
  %p0 = bf16[4,32]{1,0} parameter(0), sharding={devices=[4,1,2]<=[8] last_tile_dim_replicate}
  %p1 = f32[16,8]{1,0} parameter(1)
  %p2 = f32[2,8]{1,0} parameter(2)
  %all-gather-start = (bf16[4,32]{1,0}, bf16[16,32]{1,0}) all-gather-start(%p0), channel_id=1, \
replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %all-reduce-start = f32[16,8]{1,0} all-reduce-start(%p1), channel_id=2, \
replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  %collective-permute-start = (f32[2,8]{1,0}, f32[2,8]{1,0}, u32[], u32[]) \
collective-permute-start(%p2), channel_id=3, \
source_target_pairs={{0,4},{4,0},{1,5},{5,1},{2,6},{6,2},{3,7},{7,3}}
  %all-gather-done = bf16[16,32]{1,0} all-gather-done(%all-gather-start)
  %all-reduce-done = f32[16,8]{1,0} all-reduce-done(%all-reduce-start)
  %collective-permute-done = f32[2,8]{1,0} collective-permute-done(%collective-permute-start)
  ROOT %tuple = (bf16[16,32]{1,0}, f32[16,8]{1,0}, f32[2,8]{1,0}) tuple(%all-gather-done, \
%all-reduce-done, %collective-permute-done)
}
""".replace("\\\n", "")


def test_async_pairs_count_once_with_the_done_shape(mesh_ab):
    assert hlo.collectives(ASYNC_HLO, mesh_ab) == [
        Collective("all-gather", "bf16", 4 * 32 * 2, 16 * 32 * 2, 4, ("b",)),
        Collective("all-reduce", "f32", M * N * F32, M * N * F32, 2, ("a",)),
        Collective("collective-permute", "f32", 2 * 8 * F32, 2 * 8 * F32, 2, ("a",)),
    ]


def test_async_start_without_done_reads_the_result_from_its_tuple(mesh_ab):
    text = "\n".join(line for line in ASYNC_HLO.splitlines() if "-done(" not in line)
    assert [(c.kind, c.result_bytes) for c in hlo.collectives(text, mesh_ab)] == [
        ("all-gather", 16 * 32 * 2),
        ("all-reduce", M * N * F32),
        ("collective-permute", 2 * 8 * F32),
    ]


def test_combined_all_reduce_and_inline_operand_shapes(mesh_ab):
    """A combined all-reduce of two dtypes, printed the older way with operand shapes inline and
    with the printer's ``/*index=N*/`` markers."""
    text = (
        "HloModule m, num_partitions=8\n"
        "ENTRY %e (a: f32[8,4], b: bf16[6]) -> (f32[8,4], bf16[6]) {\n"
        "  ROOT %all-reduce.3 = (f32[8,4]{1,0}, /*index=1*/bf16[6]{0}) "
        "all-reduce(f32[8,4]{1,0} %a, /*index=1*/bf16[6]{0} %b), channel_id=7, "
        "replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add\n"
        "}\n"
    )
    bytes_ = 8 * 4 * F32 + 6 * 2
    assert hlo.collectives(text, mesh_ab) == [
        Collective("all-reduce", "f32+bf16", bytes_, bytes_, 8, ("a", "b"))
    ]


def test_collective_permute_axes_are_those_its_pairs_move_along(mesh_ab):
    """Pairs ``0 -> 5 -> 0`` and ``1 -> 1`` on the ``(a, b)`` mesh: 0 is (0, 0), 5 is (1, 1)."""
    text = (
        "ENTRY %e (p: f32[4]) -> f32[4] {\n"
        "  %p = f32[4]{0} parameter(0)\n"
        "  ROOT %cp = f32[4]{0} collective-permute(%p), channel_id=1, "
        "source_target_pairs={{0,5},{5,0},{1,1}}\n"
        "}\n"
    )
    assert hlo.collectives(text, mesh_ab) == [
        Collective("collective-permute", "f32", 16, 16, 2, ("a", "b"))
    ]


def test_summarize_sorts_and_adds_counts():
    ar = Collective("all-reduce", "f32", 8, 8, 2, ("a",))
    ag = Collective("all-gather", "f32", 4, 8, 2, ("a",))
    assert hlo.summarize([ar, ag, ar, ag, dataclasses.replace(ar, count=3)]) == [
        dataclasses.replace(ag, count=2),
        dataclasses.replace(ar, count=5),
    ]
