"""Two CPU processes on loopback run one tensor-parallel forward whose ``model`` mesh axis spans
both: it equals an unsharded forward on one device, and its program has cross-process
collectives."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import models
from experiments import sharded_forward


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra
    )
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_tensor_parallel_forward_equals_one_device(tmp_path):
    out = tmp_path / "logits.npy"
    port = _free_port()
    cmd = [sys.executable, "-m", "experiments.sharded_forward", "--out", str(out)]
    procs = [
        subprocess.Popen(
            cmd,
            env=_env(
                4,
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
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]

    cfg = models.get_config("dense-tiny")
    tokens_BT = sharded_forward.fixed_tokens(4, 16, cfg.vocab_size, seed=0)
    model = models.build(cfg, seed=0)
    want_BTV = np.asarray(model(jax.device_put(tokens_BT, jax.devices()[0])))
    got_BTV = np.load(out)
    assert got_BTV.shape == (4, 16, cfg.vocab_size) and got_BTV.dtype == np.float32
    np.testing.assert_allclose(got_BTV, want_BTV, atol=1e-5, rtol=1e-5)

    summary = json.loads(out.with_suffix(".json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 8)
    assert summary["mesh"] == {"data": 2, "model": 4}
    assert summary["axes_across_processes"] == ["model"]
    # Tensor parallelism all-reduces partial sums over ``model``, which spans both processes.
    assert summary["cross_process"] > 0 and summary["kinds"].get("all-reduce/model", 0) > 0
    assert json.loads(outs[0][0].strip().splitlines()[-1]) == summary
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # primary only
