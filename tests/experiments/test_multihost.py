"""Two processes on loopback train data-parallel exactly like one process with the same devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

CONFIG = "experiments/configs/dense_tiny.py:smoke"
OVERRIDES = ["steps=6", "warmup_steps=1", "log_every=1", "eval_every=6", "checkpoint_every=6"]


def _command(workdir):
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        "--noprogress",
    ]
    for o in OVERRIDES:
        cmd += ["--set", o]
    return cmd


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra
    )
    return env


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return np.array([r["loss"] for r in records if r["split"] == "train"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one, two, single = tmp_path / "one", tmp_path / "two", tmp_path / "single"
    subprocess.run(_command(one), env=_env(4), check=True, capture_output=True, timeout=300)
    subprocess.run(_command(single), env=_env(1), check=True, capture_output=True, timeout=300)
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(two),
            env=_env(
                2,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert len(_losses(one)) == 6
    # 2 processes x 2 devices == 1 process x 4 devices (same sharding, gloo all-reduce) ...
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    # ... == one device without data parallelism, up to reduction order.
    np.testing.assert_allclose(_losses(one), _losses(single), rtol=1e-4)
    assert (two / "checkpoints" / "6").is_dir()
    assert json.loads(outs[0][0].strip().splitlines()[-1])["step"] == 6
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # primary only
