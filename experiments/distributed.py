"""Several processes (hosts) and data parallelism for the trainer.

Every host runs the same command, one process per host (JAX drives all of a host's
accelerators from one process); ``initialize_from_env`` then calls ``jax.distributed.initialize``
before anything touches a device.

Cloud TPU pod slice: JAX finds the other workers of the slice itself (from the TPU VM's
metadata), so run the command on every worker at once::

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
        --command="cd kestrel && python -m experiments.train --config ... --workdir gs://..."

GPU cluster under SLURM: one task per node; JAX reads the coordinator (the first node of the
step), the process count and the rank from SLURM's variables::

    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
        python -m experiments.train --config ... --workdir /shared/run

Open MPI (``mpirun -np 2 --map-by node ...``) is detected the same way. Anywhere else (plain
SSH, Kubernetes without JAX's detection, or two CPU processes on one machine) name the
coordinator on every host::

    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0 or 1> \
        python -m experiments.train --config ... --workdir <shared directory>

The trainer then runs over a ``("data", "model")`` mesh of every device of every process:
the global batch is split over ``data`` (all hosts compute the same deterministic global batch
and each keeps its own shard) and the weights are laid out by the logical-axis rules of
``partitioning.rules`` (replicated for ``data_parallel``; split over ``model`` for
``tensor_parallel``). XLA inserts the collectives: gradient all-reduce, tensor-parallel
all-reduce or all-gather. ``experiments.sharded_forward`` is the smallest multi-host program:
a tensor-parallel forward whose ``model`` axis spans the processes
(``tests/experiments/test_multihost_forward.py`` runs it as 2 CPU processes on loopback).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def detected_launcher() -> str | None:
    """The launcher that started this process as one of several, if JAX can read it alone.

    ``"slurm"`` inside an ``srun`` step of more than one task, ``"openmpi"`` under ``mpirun``
    with more than one rank, ``"tpu"`` on a Cloud TPU VM (unless ``JAX_PLATFORMS`` leaves out
    TPUs); ``None`` otherwise.
    """
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    platforms = env.get("JAX_PLATFORMS", "")
    if (not platforms or "tpu" in platforms.split(",")) and _on_cloud_tpu_vm():
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    # Set by ``import jax`` when it finds TPU chips and libtpu (jax/_src/cloud_tpu_init.py);
    # the same test JAX's own TPU cluster detection makes.
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a private module: absent in some JAX version, assume no TPU VM
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_from_env() -> bool:
    """``jax.distributed.initialize`` for a multi-process run; True if it ran (or had run).

    From ``ENV_VARS`` when ``JAX_COORDINATOR_ADDRESS`` is set, else with no arguments (JAX reads
    the launcher's variables) when ``detected_launcher`` names one; a single process without
    either does nothing. Call it before any computation touches a device.
    """
    explicit = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if explicit:
        missing = [v for v in ENV_VARS if not os.environ.get(v)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
    elif detected_launcher() is None:
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU processes exchange data through gloo; accelerators ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not explicit:
        jax.distributed.initialize()
        return True
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True


def is_primary() -> bool:
    """Process 0 writes logs, configs and plots (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def train_mesh(batch_size: int, model_parallel: int = 1) -> Mesh:
    """A ``("data", "model")`` mesh: ``model_parallel`` devices per model replica, and as many
    replicas as divide ``batch_size``.

    With several processes every device must take part, so the batch must divide evenly.
    """
    devices = jax.devices()
    n = len(devices)
    if model_parallel < 1 or n % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the {n} devices")
    replicas = n // model_parallel
    if batch_size % replicas:
        if jax.process_count() > 1:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {replicas} data-parallel "
                f"replicas of {jax.process_count()} processes"
            )
        replicas = max(d for d in range(1, replicas + 1) if batch_size % d == 0)
    grid = np.array(devices[: replicas * model_parallel]).reshape(replicas, model_parallel)
    return Mesh(grid, ("data", "model"))


def _put(tree, sharding):
    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def place(tree, specs, mesh: Mesh):
    """Put each array of ``tree`` on ``mesh`` with the ``PartitionSpec`` at the same place in
    ``specs`` (hosts pass identical host values; each keeps its own shards)."""
    leaves, treedef = jax.tree.flatten(tree)
    spec_leaves = treedef.flatten_up_to(specs)
    placed = [_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, spec_leaves, strict=True)]
    return jax.tree.unflatten(treedef, placed)


def replicate(tree, mesh: Mesh):
    """Copies of every array of ``tree`` on every device of ``mesh``."""
    return _put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Split each ``[B, ...]`` array of the (identical on every host) global batch over ``data``."""
    return _put(batch, NamedSharding(mesh, PartitionSpec("data")))
