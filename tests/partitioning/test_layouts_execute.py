"""Every layout the planner emits runs prefill and cached decode on the 8-device CPU mesh with
the logits of one device (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import partitioning
from partitioning import rules

# 8 query heads and 2 kv heads: kv heads split 2 ways but are replicated on 4- and 8-way
# model axes, the MQA-like case of Pope et al. §3.3.
CFG = models.get_config(
    "dense-tiny", num_heads=8, num_kv_heads=2, d_model=64, ffn_dim=256, vocab_size=256
)
BATCH, PROMPT, STEPS = 8, 10, 3


def _prefill_then_decode(model, tokens_BT):
    state = model.init_state(BATCH, PROMPT + STEPS)
    logits, state = model.step(tokens_BT[:, :PROMPT], state, fresh=True)
    out = [logits]
    for i in range(STEPS):
        logits, state = model.step(tokens_BT[:, PROMPT + i : PROMPT + i + 1], state)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


def _all_plans():
    seen, out = set(), []
    for phase in ("prefill", "decode"):
        for p in partitioning.plan(
            CFG, "cpu", "2x2x2", phase=phase, batch=BATCH, context=PROMPT + STEPS
        ):
            key = (p.layout.ffn, p.layout.attention, tuple(p.mesh_shape.values()))
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


PLANS = _all_plans()


@pytest.fixture(scope="module")
def reference():
    model = models.build(CFG, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, PROMPT + STEPS), 0, CFG.vocab_size)
    with jax.default_device(jax.devices()[0]):
        want = np.asarray(jax.jit(_prefill_then_decode)(model, tokens))
    full = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
    np.testing.assert_allclose(want, full, atol=1e-5)  # cached decode == full forward
    return model, tokens, want


def test_planner_emits_every_layout_family():
    ffns = {p.layout.ffn for p in PLANS}
    assert ffns == set(partitioning.layouts.FFN_LAYOUTS)
    assert {p.layout.attention for p in PLANS} == {"head_sharded", "batch_sharded"}
    assert len(PLANS) >= 20


@pytest.mark.parametrize(
    "plan", PLANS, ids=[f"{p.layout.ffn}-{p.layout.attention}-{p.mesh_shape}" for p in PLANS]
)
def test_layout_matches_one_device(plan, reference):
    model, tokens, want = reference
    model = nnx.clone(model)
    mesh = plan.mesh()
    rules.shard_model(model, mesh, plan.param_rules)
    with rules.activation_sharding(mesh, plan.compute_rules):
        got = jax.jit(_prefill_then_decode)(model, tokens)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # The weights really are split as the plan says (e.g. ffn over every ``model`` chip).
    up = model.blocks[0].channel.up.kernel[...]
    assert up.sharding.shard_shape(up.shape)[1] == CFG.ffn_dim // plan.mesh_shape["model"]
