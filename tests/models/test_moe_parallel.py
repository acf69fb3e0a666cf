"""moe-tiny with its experts split over a mesh axis: the MoE block takes the expert-parallel
path (two all-to-alls under ``shard_map``) and equals the one-device model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from partitioning import mesh as kmesh
from partitioning import rules

RULES = rules.get_rules("tensor_parallel")  # experts -> "model", act_batch -> "data"


def _tokens(B=4, T=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 264, (B, T)), jnp.int32)


def _sharded(model, tokens, mesh_axes, fn):
    mesh = kmesh.make_mesh(mesh_axes)
    rules.shard_model(model, mesh, RULES)
    with rules.activation_sharding(mesh, RULES):
        compiled = jax.jit(fn).lower(model, tokens).compile()
        return compiled(model, tokens), compiled.as_text()


@pytest.mark.parametrize(
    "mesh_axes, dispatch",
    [
        ({"data": 2, "model": 4}, "dropless"),
        ({"data": 4, "model": 2}, "dropless"),
        ({"data": 2, "model": 4}, "capacity"),
    ],
)
def test_expert_parallel_forward_equals_one_device(mesh_axes, dispatch):
    cfg = models.get_config("moe-tiny", moe_dispatch=dispatch, capacity_factor=8.0)
    tokens = _tokens()
    want = models.build(cfg, seed=1)(tokens)
    got, hlo = _sharded(models.build(cfg, seed=1), tokens, mesh_axes, lambda m, t: m(t))
    assert "all-to-all" in hlo  # the expert-parallel path ran
    np.testing.assert_allclose(got.logits, want.logits, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got.aux_loss, want.aux_loss, rtol=1e-5)
    assert float(got.router_stats["dropped_fraction"]) == 0.0


def test_expert_parallel_decode_equals_full_forward():
    """Prefill then cached decode steps on the mesh, against the one-device full forward."""
    cfg = models.get_config("moe-tiny")
    tokens = _tokens(B=4, T=12)
    want = models.build(cfg, seed=2)(tokens).logits

    def prefill_then_decode(model, tokens):
        state = model.init_state(4, 16)
        logits, state = model.step(tokens[:, :8], state, fresh=True)
        out = [logits]
        for t in range(8, 12):
            logits, state = model.step(tokens[:, t : t + 1], state)
            out.append(logits)
        return jnp.concatenate(out, axis=1)

    got, hlo = _sharded(
        models.build(cfg, seed=2), tokens, {"data": 2, "model": 4}, prefill_then_decode
    )
    assert "all-to-all" in hlo
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
