"""For every layout, the collectives XLA compiles for one transformer layer (prefill and a
decode step, on the 8-device CPU mesh) are those the cost model predicts: kind, mesh axes and
bytes per chip.

XLA's CPU pipeline does not form reduce-scatters: a reduce-scatter of the cost model appears
as an all-reduce of the same operand followed by a local slice, so predicted reduce-scatters
are compared as all-reduces of their operand bytes (on TPU and GPU XLA fuses the pair).
"""

import collections

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models
from partitioning import cost, hlo, rules
from partitioning.planner import Plan
from tests.partitioning.test_layouts_execute import BATCH, CFG, PLANS

CONTEXT, PROMPT = 16, 8


def _predicted(plan: Plan, phase: str, tokens: int) -> dict:
    est = cost.estimate(
        CFG,
        plan.layout,
        phase=phase,
        batch=BATCH,
        context=tokens,
        weights_dtype="f32",
        kv_dtype="f32",
        activation_dtype="f32",
        compute_dtype="float32",
    )
    out = collections.Counter()
    for c in est.layers[0].comms:
        kind = "all-reduce" if c.kind == "reduce-scatter" else c.kind
        out[(kind, frozenset(c.axes))] += c.operand_bytes
    return dict(out)


def _compiled(plan: Plan, phase: str):
    model = nnx.clone(models.build(CFG, seed=0))
    block = model.blocks[0]
    mesh = plan.mesh()
    rules.shard_model(model, mesh, plan.param_rules)
    T = PROMPT if phase == "prefill" else 1
    x = jnp.zeros((BATCH, T, CFG.d_model), jnp.float32)
    with rules.activation_sharding(mesh, plan.compute_rules):

        def layer(block, x_BTD, cache, starts_B):
            from models.state import Segment

            x_BTD = rules.shard_as(x_BTD, ("act_batch", "act_seq", "act_embed"))
            seg = Segment(starts_B, starts_B + T, T, fresh=phase == "prefill")
            return block(x_BTD, seg, cache)

        cache = block.init_state(BATCH, CONTEXT)
        starts = jnp.full((BATCH,), 0 if phase == "prefill" else CONTEXT - 1, jnp.int32)
        compiled = jax.jit(layer).lower(block, x, cache, starts).compile()
    return compiled, mesh


def _measured(compiled, mesh) -> dict:
    out = collections.Counter()
    for c in hlo.collectives(compiled, mesh):
        out[(c.kind, frozenset(c.axes))] += c.operand_bytes
    return dict(out)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize(
    "plan", PLANS, ids=[f"{p.layout.ffn}-{p.layout.attention}-{p.mesh_shape}" for p in PLANS]
)
def test_compiled_collectives_match_cost_model(plan, phase):
    compiled, mesh = _compiled(plan, phase)
    tokens = PROMPT if phase == "prefill" else CONTEXT
    assert _measured(compiled, mesh) == pytest.approx(_predicted(plan, phase, tokens))


def test_the_check_tells_layouts_apart():
    """Each layout's prediction matches its own program and no other layout's: compiled under
    1D weight-stationary rules, the layer does not match the 2D or weight-gathered
    predictions on the same chips."""
    one_d = next(
        p
        for p in PLANS
        if p.layout.ffn == "1d_weight_stationary"
        and p.mesh_shape["model"] == 8
        and p.layout.attention == "head_sharded"
    )
    measured = _measured(*_compiled(one_d, "prefill"))
    assert measured == pytest.approx(_predicted(one_d, "prefill", PROMPT))
    for other in PLANS:
        if other.layout.ffn != "1d_weight_stationary":
            assert measured != pytest.approx(_predicted(other, "prefill", PROMPT)), other
