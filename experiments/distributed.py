"""Several processes (hosts) and data parallelism for the trainer.

Every host runs the same command. On TPU VMs and under SLURM JAX finds its peers by itself;
elsewhere set, on each host::

    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0 or 1> \
        python -m experiments.train --config ... --workdir <shared directory>

The trainer then runs data-parallel over every device of every process: parameters and
optimizer state replicated, the global batch split along its batch dimension (all hosts
compute the same deterministic global batch and each keeps its own shard), gradients averaged
by the all-reduce XLA inserts. Model-parallel layouts come from ``partitioning``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env() -> bool:
    """``jax.distributed.initialize`` from ``ENV_VARS`` when they are set; True if it ran."""
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
    if jax.distributed.is_initialized():
        return True
    # CPU processes exchange gradients through gloo; accelerators ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True


def is_primary() -> bool:
    """Process 0 writes logs, configs and plots (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def data_mesh(batch_size: int) -> Mesh:
    """A 1-D ``("data",)`` mesh over as many devices as divide ``batch_size``.

    With several processes every device must take part, so the batch must divide evenly.
    """
    devices = jax.devices()
    n = len(devices)
    if batch_size % n:
        if jax.process_count() > 1:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {n} devices of "
                f"{jax.process_count()} processes"
            )
        n = max(d for d in range(1, n + 1) if batch_size % d == 0)
    return Mesh(np.array(devices[:n]), ("data",))


def _put(tree, sharding):
    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
    """Copies of every array of ``tree`` on every device of ``mesh``."""
    return _put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Split each ``[B, ...]`` array of the (identical on every host) global batch over ``data``."""
    return _put(batch, NamedSharding(mesh, PartitionSpec("data")))
