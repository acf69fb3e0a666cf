"""MoE presets train with ``experiments.train``: the router losses enter the objective and the
metrics; the ``moe_tiny`` run config's variants load."""

import json
import pathlib

import numpy as np
import pytest

from experiments import train, trainer
from experiments.data import DataConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
MOE_TINY = REPO / "experiments" / "configs" / "moe_tiny.py"
COPYING = DataConfig(kind="copying", seq_len=16, batch_size=8, vocab_size=16, copy_len=6)
SMALL = dict(d_model=32, num_heads=2, num_kv_heads=1, moe_ffn_dim=32)


def _run(tmp_path, **model_overrides):
    cfg = trainer.TrainConfig(
        model="moe-tiny",
        model_overrides={**SMALL, **model_overrides},
        data=COPYING,
        steps=3,
        lr=1e-2,
        warmup_steps=1,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=100,
        log_every=1,
    )
    trainer.train(cfg, tmp_path, progress=False)
    lines = (tmp_path / trainer.METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_router_losses_are_logged_and_weighted(tmp_path):
    records = _run(tmp_path / "on", router_z_loss_coef=1e-3)
    aux = np.array([r["aux_loss"] for r in records])
    # coef * load balance (>= coef at a balanced router, k * coef at worst) + z-loss > 0
    assert len(aux) == 3 and np.all(np.isfinite(aux)) and np.all(aux > 0.01)
    off = _run(tmp_path / "off", moe_dispatch="capacity", router_aux_loss_coef=0.0)
    assert all(r["aux_loss"] == 0.0 for r in off)


def test_moe_tiny_run_config_variants_load():
    for arg in ("", "smoke", "capacity", "capacity,smoke"):
        cfg = train.load_config(f"{MOE_TINY}:{arg}" if arg else str(MOE_TINY))
        assert cfg.model == "moe-tiny" and cfg.smoke == ("smoke" in arg)
        assert cfg.model_overrides.get("moe_dispatch", "dropless") == (
            "capacity" if "capacity" in arg else "dropless"
        )
    with pytest.raises(ValueError, match="unknown moe_tiny arg 'big'"):
        train.load_config(f"{MOE_TINY}:big")


def test_bench_set_parses_model_fields():
    from experiments import bench

    got = bench.model_overrides(["moe_dispatch=capacity", "capacity_factor=2", "num_experts=8"])
    assert got == {"moe_dispatch": "capacity", "capacity_factor": 2.0, "num_experts": 8}
    with pytest.raises(ValueError, match="ModelConfig field, got 'experts=8'"):
        bench.model_overrides(["experts=8"])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dense")
    cfg = trainer.TrainConfig(
        model="dense-tiny", model_overrides=DENSE, data=COPYING, steps=2, warmup_steps=1,
        eval_every=100, eval_batches=1, checkpoint_every=100, log_every=1,
    )  # fmt: skip
    trainer.train(cfg, workdir, progress=False)
    return workdir


DENSE = dict(d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=48, vocab_size=16)


def test_init_from_a_dense_run_upcycles_it(dense_run):
    """The run's model starts as the dense checkpoint upcycled: the same logits."""
    from experiments import checkpoint

    dense, _ = checkpoint.load_model(dense_run)
    upcycled = dict(DENSE, channel_pattern=("moe",), num_experts=4, moe_ffn_dim=48)
    cfg = trainer.TrainConfig(
        model="dense-tiny", model_overrides=upcycled, data=COPYING, init_from=str(dense_run)
    )
    model = trainer.initial_model(cfg, trainer.model_config(cfg, 16))
    tokens = np.random.default_rng(0).integers(0, 16, (2, 16)).astype(np.int32)
    np.testing.assert_allclose(model(tokens).logits, dense(tokens), atol=1e-5, rtol=1e-5)
    same = trainer.TrainConfig(
        model="dense-tiny", model_overrides=DENSE, data=COPYING, init_from=str(dense_run)
    )
    np.testing.assert_array_equal(
        trainer.initial_model(same, trainer.model_config(same, 16))(tokens), dense(tokens)
    )
    wrong = dict(upcycled, moe_ffn_dim=32)
    bad = trainer.TrainConfig(model="dense-tiny", model_overrides=wrong, data=COPYING,
                              init_from=str(dense_run))  # fmt: skip
    with pytest.raises(ValueError, match=r"fields that differ: \['moe_ffn_dim'\]"):
        trainer.initial_model(bad, trainer.model_config(bad, 16))


def test_upcycle_run_config_loads():
    cfg = train.load_config(str(REPO / "experiments/configs/upcycle_tiny.py:smoke"))
    assert cfg.init_from == "runs/dense_tiny_smoke" and cfg.smoke
    mcfg = trainer.model_config(cfg, 264)
    assert mcfg.num_experts == 4 and mcfg.expert_ffn_dim == mcfg.ffn_dim
