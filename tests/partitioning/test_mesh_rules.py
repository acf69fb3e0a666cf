"""Meshes from slice descriptions, logical-axis rules, and sharded == single-device forward."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib


def test_parse_slice():
    assert mesh_lib.parse_slice("tpu-v4:4x4x4") == mesh_lib.SliceSpec("tpu-v4", (4, 4, 4))
    spec = mesh_lib.parse_slice("tpu-v5e:16x16*4")
    assert spec.num_devices == 1024 and spec.devices_per_slice == 256
    assert mesh_lib.parse_slice("h100:8").topology == (8,)
    with pytest.raises(ValueError, match="unknown hardware 'gpu'"):
        mesh_lib.parse_slice("gpu:8")
    with pytest.raises(ValueError, match="bad slice 'tpu-v4'"):
        mesh_lib.parse_slice("tpu-v4")


def test_make_mesh_fills_and_orders_axes():
    mesh = mesh_lib.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    # Two slices of four devices: "data" = 2 (DCN) x 2 (ICI), slices are device groups 0-3, 4-7.
    mesh = mesh_lib.make_mesh({"data": -1, "model": 2}, dcn={"data": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="at most one ICI axis may be -1"):
        mesh_lib.make_mesh({"data": -1, "model": -1})
    with pytest.raises(ValueError, match="do not divide 8 devices"):
        mesh_lib.make_mesh({"data": 3, "model": -1})
    with pytest.raises(ValueError, match="has 64 devices but 8 are available"):
        mesh_lib.mesh_for_slice("tpu-v4:4x4x4", {"data": -1})
    assert dict(mesh_lib.mesh_for_slice("cpu:4*2", {"data": -1, "model": 2}).shape) == {
        "data": 4,
        "model": 2,
    }


def test_spec_for_rules():
    mesh = mesh_lib.make_mesh({"data": 2, "model": 4})
    tp = rules_lib.get_rules("tensor_parallel")
    assert rules_lib.spec_for((64, 4, 16), ("embed", "heads", "head_dim"), tp, mesh) == P(
        None, "model", None
    )
    # 2 kv heads cannot split 4 ways: replicated.
    assert rules_lib.spec_for((64, 2, 16), ("embed", "kv_heads", "head_dim"), tp, mesh) == P(
        None, None, None
    )
    fsdp_tp = rules_lib.get_rules("fsdp_tp")
    assert rules_lib.spec_for((64, 192), ("embed", "mlp"), fsdp_tp, mesh) == P("data", "model")
    # A mesh axis is used once: the second "model" dimension stays whole.
    both = rules_lib.get_rules("tensor_parallel", embed="model")
    assert rules_lib.spec_for((64, 192), ("embed", "mlp"), both, mesh) == P("model", None)
    with pytest.raises(ValueError, match="unknown rules preset 'megatron'"):
        rules_lib.get_rules("megatron")
    with pytest.raises(ValueError, match=r"unknown logical axes \['hidden'\]"):
        rules_lib.get_rules("fsdp", hidden="data")


@pytest.mark.parametrize("preset", ["tensor_parallel", "fsdp_tp", "fsdp"])
def test_sharded_forward_equals_single_device(preset):
    cfg = models.get_config("dense-tiny")
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, cfg.vocab_size)
    want = np.asarray(models.build(cfg, seed=1)(tokens))
    model = models.build(cfg, seed=1)
    mesh = mesh_lib.make_mesh({"data": 2, "model": 4})
    rules = rules_lib.get_rules(preset)
    rules_lib.shard_model(model, mesh, rules)
    q = model.blocks[0].mixer.q.kernel[...]
    spec = rules_lib.spec_for(q.shape, ("embed", "heads", "head_dim"), rules, mesh)
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, spec), q.ndim)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.size < q.size
    tokens = rules_lib.constrain(tokens, ("act_batch", "act_seq"), rules, mesh)
    got = jax.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_sharding_report_bytes():
    cfg = models.get_config("dense-tiny")
    model = models.build(cfg)
    mesh = mesh_lib.make_mesh({"data": 2, "model": 4})
    rows = rules_lib.sharding_report(model, mesh, rules_lib.get_rules("tensor_parallel"))
    by_path = {r.path: r for r in rows}
    q = by_path["blocks.0.mixer.q.kernel"]
    assert q.bytes_per_device == 64 * 4 * 16 * 4 // 4 and q.spec == P(None, "model", None)
    k = by_path["blocks.0.mixer.k.kernel"]
    assert k.bytes_per_device == 64 * 2 * 16 * 4  # replicated
    assert len(rows) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    text = rules_lib.format_report(rows)
    assert "blocks.0.mixer.q.kernel" in text and text.splitlines()[-1].startswith("total")


@pytest.mark.parametrize("preset", ["tensor_parallel", "fsdp_tp"])
def test_sharded_generation_equals_single_device(preset):
    """Prefill and cached decode with sharded weights give the unsharded greedy tokens."""
    cfg = models.get_config("dense-tiny", num_kv_heads=4)  # 4 kv heads: split 4 ways
    prompts = [[1, 2, 3, 4, 5], list(range(30, 41))]
    want = models.generate(models.build(cfg, seed=2), prompts, max_new_tokens=8).tokens
    model = models.build(cfg, seed=2)
    mesh = mesh_lib.make_mesh({"data": 2, "model": 4})
    rules_lib.shard_model(model, mesh, rules_lib.get_rules(preset))
    assert len(model.blocks[0].mixer.k.kernel[...].sharding.device_set) == 8
    assert models.generate(model, prompts, max_new_tokens=8).tokens == want
