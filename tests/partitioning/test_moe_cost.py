"""The cost model and planner for mixture-of-experts layers: the expert-parallel all-to-alls
against the compiled HLO of ``models.expert_parallel`` on the 8-device CPU mesh, closed forms
of the FLOP and byte counts, and plans for a Mixtral-shaped model in both expert layouts."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import partitioning
from models.configs import ModelConfig
from models.expert_parallel import expert_parallel_ffn
from partitioning import cost, hardware, hlo
from partitioning.layouts import EXPERT_LAYOUTS, MESH_AXES, Layout

CPU = hardware.get("cpu")
# Mixtral 8x7B (arXiv:2401.04088 §2): 46,702,792,704 parameters.
MIXTRAL = ModelConfig(
    name="mixtral-8x7b",
    vocab_size=32000,
    d_model=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    ffn_dim=14336,
    num_experts=8,
    experts_per_token=2,
    channel_pattern=("moe",),
)
TINY = ModelConfig(
    name="moe-hlo",
    vocab_size=64,
    d_model=16,
    num_layers=1,
    num_heads=8,
    num_kv_heads=8,
    ffn_dim=32,
    moe_ffn_dim=24,
    num_experts=8,
    experts_per_token=2,
    channel_pattern=("moe",),
    moe_dispatch="capacity",
)


def _layout(replica: int, model: int, experts="expert_parallel", chip=CPU) -> Layout:
    groups = ((replica,) if replica > 1 else (), (), (), (model,))
    return Layout("1d_weight_stationary", "head_sharded", groups, chip, experts)


@pytest.mark.parametrize("capacity_factor", [1.0, 2.0])
@pytest.mark.parametrize("replica, model", [(1, 8), (2, 4)], ids=["model=8", "replica=2,model=4"])
def test_compiled_all_to_alls_match_cost_model(replica, model, capacity_factor):
    cfg = TINY.replace(capacity_factor=capacity_factor)
    T, D, F, E, K = 32, cfg.d_model, cfg.expert_ffn_dim, cfg.num_experts, cfg.experts_per_token
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(replica, 1, 1, model), MESH_AXES)
    f32 = jax.ShapeDtypeStruct
    args = (
        f32((T, D), jnp.float32),
        f32((T, K), jnp.int32),
        f32((T, K), jnp.float32),
        f32((E, D, F), jnp.float32),
        f32((E, D, F), jnp.float32),
        f32((E, F, D), jnp.float32),
    )

    def ffn(*a):
        return expert_parallel_ffn(
            *a,
            mesh=mesh,
            axis="model",
            data_axis="replica" if replica > 1 else None,
            capacity_factor=capacity_factor,
        )

    measured = collections.Counter()
    for c in hlo.collectives(jax.jit(ffn).lower(*args).compile(), mesh):
        if c.kind == "all-to-all":
            measured[(c.dtype, c.axes)] += c.operand_bytes

    layout = _layout(replica, model)
    predicted_comms = cost.expert_parallel_comms(
        layout,
        tokens=T / replica,
        d_model=D,
        experts_per_token=K,
        capacity_factor=capacity_factor,
        act_bytes=4,
    )
    predicted = collections.Counter()
    for c, dtype in zip(predicted_comms, ("f32", "s32", "f32"), strict=True):
        predicted[(dtype, c.axes)] += c.operand_bytes
    assert dict(measured) == pytest.approx(dict(predicted))
    # Closed form: [model, ceil(cf * t * k / model), D] per chip, t = T / 8 local tokens.
    slots = math.ceil(capacity_factor * T / 8 * K / model)
    assert predicted[("f32", ("model",))] == 2 * model * slots * D * 4
    # ... and the layer cost of ``estimate`` holds these all-to-alls.
    est = cost.estimate(
        cfg, layout, phase="decode", batch=T, context=8, activation_dtype="f32",
        weights_dtype="f32", kv_dtype="f32", compute_dtype="float32",
    )  # fmt: skip
    layer = collections.Counter(est.layers[0].comms)
    assert all(layer[c] >= n for c, n in collections.Counter(predicted_comms).items())


def test_mixtral_parameter_counts():
    est = cost.estimate(MIXTRAL, _layout(1, 8, chip=hardware.get("h100")), phase="decode",
                        batch=1, context=128)  # fmt: skip
    assert est.total_params == 46_702_792_704
    D, L, F = 4096, 32, 14336
    expert = 3 * D * F
    assert est.active_params == est.total_params - L * 6 * expert  # 2 of 8 experts active
    assert est.active_params == pytest.approx(12.9e9, rel=0.01)  # the paper's 12.9B


@pytest.mark.parametrize("experts", EXPERT_LAYOUTS)
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_decode_flops_and_weight_bytes_closed_form(experts, batch):
    """On one chip: FLOPs count k of E experts per token; weight bytes the touched experts,
    E (1 - (1 - k/E)^b) of them under uniform routing; memory holds all of them."""
    cfg = MIXTRAL.replace(num_layers=1)
    D, N, K, H, E, k, F = 4096, 32, 8, 128, 8, 2, 14336
    ctx = 256
    layout = Layout("1d_weight_stationary", "head_sharded", ((), (), (), ()), CPU, experts)
    est = cost.estimate(cfg, layout, phase="decode", batch=batch, context=ctx)
    attn_w = 2 * D * N * H + 2 * D * K * H
    router = D * E
    expert = 3 * D * F
    (layer,) = est.layers
    assert layer.flops == pytest.approx(
        2 * batch * (attn_w + router + k * expert) + 4 * batch * ctx * N * H
    )
    touched = E * (1 - (1 - k / E) ** batch)
    kv = batch * ctx * K * H * 2 * 2
    assert layer.hbm_bytes == pytest.approx((attn_w + router + touched * expert) * 2 + kv)
    assert est.params_bytes_per_chip == pytest.approx(2 * (attn_w + router + E * expert + 2 * D
                                                           + 2 * 32000 * D + D))  # fmt: skip
    assert est.weight_bytes_per_token == pytest.approx(
        (attn_w + router + touched * expert + D * 32000) * 2 / batch
    )


def test_expert_layouts_split_the_same_bytes_differently():
    """8 chips, Mixtral: both layouts store 1/8 of the expert weights per chip; tensor-parallel
    experts all-reduce (here: reduce-scatter) like the dense FFN, expert-parallel moves
    tokens * k * D bytes in each direction, split over the chips."""
    h100 = hardware.get("h100")
    b = 64
    ep = cost.estimate(MIXTRAL, _layout(1, 8, chip=h100), phase="decode", batch=b, context=4096)
    tp = cost.estimate(
        MIXTRAL, _layout(1, 8, "tensor_parallel", h100), phase="decode", batch=b, context=4096
    )
    assert ep.params_bytes_per_chip == pytest.approx(tp.params_bytes_per_chip)
    assert ep.params_bytes_per_chip == pytest.approx(
        2 * (MIXTRAL.num_layers * (8 * 3 * 4096 * 14336 + 2 * 4096 * 5120) / 8
             + 2 * 32000 * 4096 / 8
             + MIXTRAL.num_layers * 4096 * 8  # the router is replicated
             + 4096 * (2 * MIXTRAL.num_layers + 1))
    )  # fmt: skip
    a2a = [c for c in ep.layers[0].comms if c.kind == "all-to-all"]
    D, k, n = 4096, 2, 8
    dispatch = b * k * D * 2 / n  # dropless: the balanced payload of each chip
    assert sorted(c.operand_bytes for c in a2a) == pytest.approx(
        sorted([dispatch, dispatch, b * k * 4 / n, b * D * 2 / n])
    )
    bandwidth = h100.ici_bandwidth
    assert a2a[0].seconds == pytest.approx(dispatch * (n - 1) / n / bandwidth)
    assert not [c for c in tp.layers[0].comms if c.kind == "all-to-all"]
    # Expert-parallel at batch 1: the two touched experts sit on two chips that each read a
    # whole expert; tensor-parallel chips read an eighth of both.
    ep1, tp1 = (
        cost.estimate(MIXTRAL, lay, phase="decode", batch=1, context=4096)
        for lay in (_layout(1, 8, chip=h100), _layout(1, 8, "tensor_parallel", h100))
    )
    expert = 3 * 4096 * 14336 * 2
    diff = ep1.layers[0].hbm_bytes - tp1.layers[0].hbm_bytes
    assert diff == pytest.approx(expert * (1 - (1 - 0.25) ** 8) - 2 * expert / 8)


@pytest.mark.parametrize("chip, topology", [("h100", "8"), ("tpu-v5e", "2x4")])
def test_planner_returns_both_expert_layouts_for_mixtral(chip, topology):
    plans = partitioning.plan(MIXTRAL, chip, topology, phase="decode", batch=16, context=4096)
    assert {p.layout.experts for p in plans} == set(EXPERT_LAYOUTS)
    for experts in EXPERT_LAYOUTS:
        (best,) = partitioning.plan(
            MIXTRAL, chip, topology, phase="decode", batch=16, context=4096, experts=experts
        )[:1]
        j = best.to_json()
        assert j["layout"]["experts"] == experts and j["fits"]
        assert j["total_params"] == 46_702_792_704
        assert j["active_params"] < j["total_params"] / 3
        # At batch 16 nearly every expert is touched: about the total weights per token / 16.
        assert j["weight_bytes_per_token"] == pytest.approx(
            2 * (46.7e9 - 32000 * 4096) / 16, rel=0.02
        )


def test_dense_models_keep_their_layout_fields():
    (p,) = partitioning.plan("dense-tiny", "cpu", "8", phase="decode", batch=8, context=64)[:1]
    assert p.layout.experts is None and set(p.to_json()["layout"]) == {"ffn", "attention"}
    with pytest.raises(ValueError, match="needs an expert layout"):
        cost.estimate(MIXTRAL, _layout(1, 8, None), phase="decode", batch=8, context=64)
    with pytest.raises(ValueError, match="num_experts=8 over 16 shards"):
        partitioning.plan(MIXTRAL, "tpu-v5e", "4x4", phase="decode", batch=16, context=64,
                          experts="expert_parallel", ffn="1d_weight_stationary",
                          replicas=False)  # fmt: skip


def test_dense_equivalent_and_comparison_rows():
    from partitioning import compare

    dense = compare.dense_equivalent(MIXTRAL)
    assert dense.ffn_dim == 2 * 14336  # two active experts' width (the router is 8 columns)
    rows = compare.compare("h100", "8", batches=(1, 128), models=(MIXTRAL, dense))
    by = {(r["model"], r["batch"]): r for r in rows}
    moe1, dense1 = by[("mixtral-8x7b", 1)], by[(dense.name, 1)]
    assert moe1["active_params"] == pytest.approx(dense1["total_params"], rel=1e-3)
    # Batch 1 touches only the active experts: the MoE decodes about as fast as the dense
    # model; at batch 128 it reads nearly all 46.7B parameters and stores them at any batch.
    assert moe1["step_ms"] == pytest.approx(dense1["step_ms"], rel=0.02)
    assert by[("mixtral-8x7b", 128)]["step_ms"] > 1.5 * by[(dense.name, 128)]["step_ms"]
    assert moe1["memory_per_chip_gb"] > 3 * dense1["memory_per_chip_gb"]
