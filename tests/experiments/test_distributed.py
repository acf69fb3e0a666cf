"""``initialize_from_env`` starts ``jax.distributed`` from explicit variables or a detected
launcher (SLURM, Open MPI, Cloud TPU VM), and leaves a lone process alone."""

import jax
import pytest

from experiments import distributed

LAUNCHER_VARS = [
    *distributed.ENV_VARS,
    "SLURM_NTASKS",
    "SLURM_STEP_NODELIST",
    "OMPI_COMM_WORLD_SIZE",
    "JAX_PLATFORMS",
]


@pytest.fixture
def calls(monkeypatch):
    """Records ``jax.distributed.initialize`` calls instead of making them, in a clean env."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    previous = jax.config.jax_cpu_collectives_implementation
    yield recorded
    jax.config.update("jax_cpu_collectives_implementation", previous)


def test_lone_process_does_nothing(calls, monkeypatch):
    assert distributed.detected_launcher() is None
    assert distributed.initialize_from_env() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job step
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    assert distributed.initialize_from_env() is False
    assert calls == []


def test_explicit_variables(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"\['JAX_PROCESS_ID'\] are not"):
        distributed.initialize_from_env()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize_from_env() is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({"SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]"}, "slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ],
)
def test_launchers_let_jax_read_their_variables(calls, monkeypatch, env, launcher):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detected_launcher() == launcher
    assert distributed.initialize_from_env() is True
    assert calls == [{}]


def test_cloud_tpu_vm_unless_platforms_exclude_tpu(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    assert distributed.detected_launcher() == "tpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # e.g. the test suite on a TPU VM
    assert distributed.detected_launcher() is None
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert distributed.initialize_from_env() is True
    assert calls == [{}]


def test_already_initialized_is_not_repeated(calls, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.initialize_from_env() is True
    assert calls == []
