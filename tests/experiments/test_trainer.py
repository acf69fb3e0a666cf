"""Tests for experiments.trainer, checkpoint, progress and the train CLI: the loss against a
numpy oracle, exact resume against an uninterrupted run, learning on a copying task, clear
checkpoint errors, ``--set`` parsing, and the CLI end to end in a subprocess."""

import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import checkpoint, train, trainer
from experiments.data import DataConfig
from experiments.progress import Progress

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64)
COPYING = DataConfig(kind="copying", seq_len=16, batch_size=16, vocab_size=16, copy_len=6)


def _config(**overrides) -> trainer.TrainConfig:
    base = dict(
        model="dense-tiny",
        model_overrides=TINY,
        data=COPYING,
        steps=8,
        lr=1e-2,
        warmup_steps=2,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=100,
        log_every=1,
    )
    return trainer.TrainConfig(**{**base, **overrides})


def _train_records(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / trainer.METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _params(workdir) -> list[np.ndarray]:
    model, _ = checkpoint.load_model(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An 8-step run in one go: (workdir, result)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, trainer.train(_config(), workdir, progress=False)


# ------------------------------------------------------------------------------------ loss


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits_BTV = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets_BT = np.array([[0, 4, 2], [1, 1, 3]], np.int32)
    mask_BT = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
    nll = []
    for b in range(2):
        for t in range(3):
            row = logits_BTV[b, t].astype(np.float64)
            log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            nll.append((log_z - row[targets_BT[b, t]]) * mask_BT[b, t])
    expected = np.sum(nll) / mask_BT.sum()
    got = trainer.masked_cross_entropy(jnp.asarray(logits_BTV), targets_BT, mask_BT)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # bfloat16 logits are upcast, a zero mask gives 0, not NaN.
    got_bf16 = trainer.masked_cross_entropy(
        jnp.asarray(logits_BTV, jnp.bfloat16), targets_BT, mask_BT
    )
    np.testing.assert_allclose(float(got_bf16), expected, rtol=2e-2)
    assert float(trainer.masked_cross_entropy(logits_BTV, targets_BT, 0 * mask_BT)) == 0.0
    # By hand: softmax([0, ln 3]) = [1/4, 3/4]; the masked-out position must not count.
    two_BTV = np.log(np.array([[[1.0, 3.0], [1.0, 1.0]]], np.float32))
    got = trainer.masked_cross_entropy(two_BTV, np.array([[1, 0]]), np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(float(got), np.log(4 / 3), rtol=1e-6)


def test_loss_decreases_on_copying_in_bfloat16(tmp_path):
    cfg = _config(
        steps=80,
        log_every=10,
        eval_every=80,
        warmup_steps=5,
        weight_decay=0.0,
        compute_dtype="bfloat16",
    )
    result = trainer.train(cfg, tmp_path, progress=False)
    model, model_cfg = checkpoint.load_model(tmp_path)
    assert (model_cfg.dtype, model_cfg.param_dtype) == ("bfloat16", "float32")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    losses = [r["loss"] for r in result["history"]["train"]]
    assert losses[0] > 2.4  # ~ln(14): uniform over the copied tokens
    assert losses[-1] < 0.6
    assert result["step"] == 80 and result["accuracy"] > 0.8
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))


# ---------------------------------------------------------------------------------- resume


def test_resume_after_interrupt_reproduces_uninterrupted_run(tmp_path, monkeypatch, uninterrupted):
    full_dir, full_result = uninterrupted
    make_dataset = trainer.make_dataset

    def interrupted_dataset(cfg):
        ds = make_dataset(cfg)
        batch = ds.batch

        def batch_or_interrupt(step):
            if step == 4:
                raise KeyboardInterrupt
            return batch(step)

        ds.batch = batch_or_interrupt
        return ds

    monkeypatch.setattr(trainer, "make_dataset", interrupted_dataset)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(), tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # the last completed step
    assert [r["step"] for r in _train_records(tmp_path)] == [1, 2, 3, 4]

    monkeypatch.setattr(trainer, "make_dataset", make_dataset)
    result = trainer.train(_config(), tmp_path, progress=False)
    resumed, full = _train_records(tmp_path), _train_records(full_dir)
    assert [r["step"] for r in resumed] == list(range(1, 9))  # nothing duplicated or lost
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(
            [r[key] for r in resumed], [r[key] for r in full], rtol=0, atol=1e-6
        )
    assert result["loss"] == full_result["loss"]
    for a, b in zip(_params(tmp_path), _params(full_dir), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rerun_of_finished_run_changes_nothing(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    lines = (workdir / trainer.METRICS_FILE).read_text()
    again = trainer.train(_config(), workdir, progress=False)
    assert (workdir / trainer.METRICS_FILE).read_text() == lines
    assert sorted(os.listdir(workdir / "checkpoints")) == ["8"]
    assert again["loss"] == uninterrupted[1]["loss"]
    assert again["history"] == uninterrupted[1]["history"]
    other_model = _config(model_overrides={**TINY, "num_layers": 1})
    with pytest.raises(ValueError, match=r"checkpoints of a different model .*num_layers"):
        trainer.train(other_model, workdir, progress=False)


# ------------------------------------------------------------------------------ load_model


def test_load_model_matches_trained_params(uninterrupted):
    workdir, _ = uninterrupted
    model, cfg = checkpoint.load_model(workdir)
    assert (cfg.d_model, cfg.vocab_size) == (32, 16)  # overrides and the task's vocabulary
    same, _ = checkpoint.load_model(workdir / "checkpoints" / "8")
    tokens_BT = jnp.asarray([[2, 3, 4, 5]], jnp.int32)
    np.testing.assert_array_equal(model(tokens_BT), same(tokens_BT))
    assert model(tokens_BT).shape == (1, 4, 16)
    with pytest.raises(ValueError, match=r"no checkpoint at step 3 .*steps: \[8\]"):
        checkpoint.load_model(workdir, step=3)


def test_load_model_errors(tmp_path, uninterrupted):
    workdir, _ = uninterrupted
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*missing"):
        checkpoint.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoints in .*empty"):
        checkpoint.load_model(tmp_path / "empty")

    no_config = tmp_path / "no_config"
    shutil.copytree(workdir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json at .*no_config"):
        checkpoint.load_model(no_config)

    for damage in ("delete", "garble"):
        broken = tmp_path / damage
        shutil.copytree(workdir, broken)
        params_dir = broken / "checkpoints" / "8" / "params"
        files = sorted(p for p in params_dir.rglob("*") if p.is_file() and "manifest" in p.name)
        assert files, sorted(params_dir.rglob("*"))
        for file in files:
            if damage == "delete":
                file.unlink()
            else:
                file.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ValueError, match=f"cannot read checkpoint .*{damage}.*8") as info:
            checkpoint.load_model(broken)
        assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------- config


def test_set_overrides_parse_types_and_nest():
    cfg = _config()
    out = train.apply_overrides(
        cfg,
        [
            "steps=20",
            "lr=3e-4",
            "smoke=true",
            "compute_dtype=bfloat16",
            "data.seq_len=32",
            "data.max_bytes=1000",
            "model_overrides.num_layers=1",
            "model_overrides.sliding_window_layers=(0,)",
            "model_overrides.head_dim=none",
        ],
    )
    assert (out.steps, out.lr, out.smoke, out.compute_dtype) == (20, 3e-4, True, "bfloat16")
    assert isinstance(out.steps, int) and isinstance(out.lr, float)
    assert (out.data.seq_len, out.data.max_bytes, out.data.kind) == (32, 1000, "copying")
    assert out.model_overrides == {
        **TINY,
        "num_layers": 1,
        "sliding_window_layers": (0,),
        "head_dim": None,
    }
    assert cfg.steps == 8 and cfg.model_overrides == TINY  # the original is untouched
    assert train.apply_overrides(cfg, ["data.max_bytes=None"]).data.max_bytes is None
    whole = train.apply_overrides(cfg, ["model_overrides={'num_layers': 3}"])
    assert whole.model_overrides == {"num_layers": 3}


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("stepz=3", r"unknown key 'stepz'; valid keys: model, .*steps.*data\.seq_len"),
        ("data.seqlen=3", r"unknown key 'data.seqlen'; valid keys: .*data\.seq_len"),
        ("model_overrides.layers=3", r"unknown key .*model_overrides\.num_layers"),
        ("lr.x=3", "unknown key 'lr.x'"),
        ("steps=ten", "steps expects int, got 'ten'"),
        ("smoke=maybe", "smoke expects a bool"),
        ("steps", "expects KEY=VALUE"),
        ("compute_dtype=float16", "unknown compute_dtype 'float16'"),
    ],
)
def test_set_override_errors(assignment, message):
    with pytest.raises(ValueError, match=message):
        train.apply_overrides(_config(), [assignment])


def test_run_configs_load_and_smoke_variants_are_small():
    for name in ("dense_tiny", "mqar_tiny"):
        path = REPO / "experiments" / "configs" / f"{name}.py"
        full = train.load_config(str(path))
        smoke = train.load_config(f"{path}:smoke")
        assert smoke.smoke and not full.smoke
        assert smoke.steps * smoke.data.batch_size * smoke.data.seq_len <= 40 * 16 * 64
        assert smoke.steps < full.steps
    mqar = train.load_config(str(REPO / "experiments/configs/mqar_tiny.py:smoke"))
    assert trainer.model_config(mqar, 64).vocab_size == 64
    with pytest.raises(ValueError, match="no run config file"):
        train.load_config("experiments/configs/nope.py:smoke")
    with pytest.raises(ValueError, match="unknown dense_tiny arg 'big'"):
        train.load_config(str(REPO / "experiments/configs/dense_tiny.py:big"))


def test_train_config_round_trips_through_json():
    cfg = _config(compute_dtype="bfloat16")
    assert trainer.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="warmup_steps"):
        dataclasses.replace(cfg, warmup_steps=8)


def test_progress_prints_periodic_lines_without_a_terminal():
    stream = io.StringIO()
    bar = Progress(10, initial=2, enabled=True, stream=stream, interval_s=0.0)
    for step in range(3, 11):
        bar.update(step, loss=1.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8 and lines[0].startswith("train  3/10")
    assert "loss 1.5" in lines[-1] and "step/s" in lines[-1] and "ETA 0:00" in lines[-1]
    quiet = io.StringIO()
    bar = Progress(10, enabled=False, stream=quiet, interval_s=3600)
    for step in range(1, 11):
        bar.update(step)
    assert [line.split(" | ")[0] for line in quiet.getvalue().splitlines()] == [
        "train  1/10  10%",
        "train 10/10 100%",
    ]


# ----------------------------------------------------------------------------------- CLI


def test_train_cli_smoke_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        "experiments/configs/dense_tiny.py:smoke",
        "--workdir",
        str(workdir),
        "--set",
        "steps=12",
        "--set",
        "data.max_bytes=200000",
        "--set",
        "eval_every=6",
        "--noprogress",
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["step"] == 12 and np.isfinite(final["loss"])
    assert "train 12/12" in proc.stderr

    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 12 and config["train"]["smoke"] is True
    assert config["model_config"]["name"] == "dense-tiny"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12]
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 12]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in records if r["split"] == "train"), key
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12"]
    assert (workdir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run(
        [*command[:7], "--set", "data.seqlen=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "unknown key 'data.seqlen'" in bad.stderr
