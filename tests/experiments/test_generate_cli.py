"""python -m experiments.generate on a freshly trained checkpoint, and its errors."""

import json
import subprocess
import sys

import pytest

from experiments import trainer
from experiments.data import DataConfig


def _generate(*args):
    cmd = [sys.executable, "-m", "experiments.generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_cli_continues_prompts(tmp_path):
    run = trainer.TrainConfig(
        model="dense-tiny",
        data=DataConfig(kind="stdlib", seq_len=32, batch_size=4, max_bytes=200_000),
        steps=4,
        warmup_steps=1,
        eval_every=4,
        eval_batches=1,
        checkpoint_every=4,
        log_every=2,
    )
    trainer.train(run, tmp_path, progress=False)
    res = _generate(
        "--checkpoint",
        str(tmp_path),
        "--prompt",
        "def f():",
        "--prompt",
        "x",
        "--max_new_tokens",
        "6",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split("\n")
    assert lines[0].startswith("def f():") and any(line.startswith("x") for line in lines)
    stats = json.loads(res.stderr.strip().splitlines()[-1])
    assert stats["batch_size"] == 2 and stats["generated_tokens"] <= 12
    # Greedy is deterministic: the same command prints the same text.
    again = _generate(
        "--checkpoint",
        str(tmp_path),
        "--prompt",
        "def f():",
        "--prompt",
        "x",
        "--max_new_tokens",
        "6",
    )
    assert again.stdout == res.stdout
    # Laid out over the 8 fake devices by the planner: the same greedy text.
    planned = _generate(
        "--checkpoint",
        str(tmp_path),
        "--prompt",
        "def f():",
        "--prompt",
        "x",
        "--max_new_tokens",
        "6",
        "--plan",
        "auto",
    )
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert planned.stdout == res.stdout
    plan = json.loads(planned.stderr.strip().splitlines()[-1])["plan"]
    assert sum(n > 1 for n in plan["mesh"].values()) >= 1 and "plan: " in planned.stderr


def test_generate_cli_missing_checkpoint(tmp_path):
    res = _generate("--checkpoint", str(tmp_path / "nope"), "--prompt", "a")
    assert res.returncode != 0
    assert "no checkpoint directory at" in res.stderr and "Traceback" not in res.stderr
