"""A tensor-parallel forward whose ``model`` mesh axis spans every process: the multi-host check.

Every process builds the same model (fixed seed) and the same token batch, lays the weights out
by ``partitioning.rules`` over a ``("data", "model")`` mesh of all global devices whose
``model`` axis crosses the process boundary, runs one jitted forward, gathers the logits to
every process, and process 0 writes them (``--out``, ``np.save``) with a JSON summary of the
compiled program's collectives next to them (``logits.npy`` -> ``logits.json``). Splitting
``model`` across hosts is the point of the check (the forward cannot run without cross-process
collectives), not a layout to train with over a data-center network.

Two CPU processes on one machine, 4 fake devices each (what
``tests/experiments/test_multihost_forward.py`` runs)::

    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \\
          python -m experiments.sharded_forward --out /tmp/logits.npy &
    done; wait

Cloud TPU pod slice (every worker runs the same command; JAX finds its peers)::

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
        --command="cd kestrel && python -m experiments.sharded_forward --out /tmp/logits.npy"

GPU cluster under SLURM, one task per node (JAX reads SLURM's variables)::

    srun --nodes=2 --ntasks-per-node=1 python -m experiments.sharded_forward --out logits.npy

See ``experiments.distributed`` for the other launchers.
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

import models
from experiments import distributed
from partitioning import hlo
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declare this entry point's flags (at launch, not at import)."""
    flags.DEFINE_string("out", None, "Where process 0 writes the logits (.npy) and a .json.")
    flags.DEFINE_string("model", "dense-tiny", "A preset of models.get_config.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and of the token batch.")
    flags.DEFINE_integer("batch", 4, "Sequences in the token batch.")
    flags.DEFINE_integer("seq_len", 16, "Tokens per sequence.")
    flags.DEFINE_integer("model_parallel", 4, "Size of the model axis (a multiple of processes).")
    flags.DEFINE_string("rules", "tensor_parallel", "A preset of partitioning.rules.")


def fixed_tokens(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The token batch ``[batch, seq_len]`` int32 every process (and any oracle) rebuilds."""
    rng = np.random.RandomState(seed)
    return rng.randint(0, vocab_size, size=(batch, seq_len)).astype(np.int32)


def global_mesh(model_parallel: int) -> Mesh:
    """A ``("data", "model")`` mesh of every device of every process; ``model`` spans them all.

    ``model`` is ``process_count`` (one group of devices per process, as on a DCN axis) times
    ``model_parallel // process_count`` devices within each process; ``data`` takes the rest.
    """
    procs = jax.process_count()
    if model_parallel % procs:
        raise ValueError(f"model_parallel={model_parallel} is not a multiple of {procs} processes")
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return mesh_lib.make_mesh(
        {"data": -1, "model": model_parallel // procs}, dcn={"model": procs}, devices=devices
    )


def axes_across_processes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes along which some line of devices belongs to more than one process."""
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    out = []
    for i, name in enumerate(mesh.axis_names):
        lines = np.moveaxis(procs, i, -1).reshape(-1, procs.shape[i])
        if any(len(set(line)) > 1 for line in lines):
            out.append(name)
    return tuple(out)


def sharded_forward(
    config: str = "dense-tiny",
    *,
    seed: int = 0,
    batch: int = 4,
    seq_len: int = 16,
    model_parallel: int = 4,
    rules: str = "tensor_parallel",
) -> tuple[np.ndarray, dict]:
    """The model's logits on ``fixed_tokens``, computed over ``global_mesh``, on every process.

    Call after ``distributed.initialize_from_env``; every process must call it with the same
    arguments.

    Returns:
      logits_BTV: float32 ``[batch, seq_len, vocab]`` numpy array (the same on every process).
      summary: mesh shape, process and device counts, and the compiled forward's collectives:
        ``collectives`` (all of them), ``cross_process`` (those over an axis that crosses
        processes), ``kinds`` (count per ``kind``/``axes``).
    """
    cfg = models.get_config(config)
    model = models.build(cfg, seed=seed)
    mesh = global_mesh(model_parallel)
    rule_set = rules_lib.get_rules(rules)
    rules_lib.shard_model(model, mesh, rule_set)
    tokens = fixed_tokens(batch, seq_len, cfg.vocab_size, seed)
    spec = rules_lib.spec_for(tokens.shape, ("act_batch", "act_seq"), rule_set, mesh)
    tokens_BT = jax.make_array_from_callback(
        tokens.shape, NamedSharding(mesh, spec), lambda index: tokens[index]
    )
    graphdef, state = nnx.split(model)

    def forward(state, tokens_BT):
        return nnx.merge(graphdef, state)(tokens_BT)

    with rules_lib.activation_sharding(mesh, rule_set):
        compiled = jax.jit(forward).lower(state, tokens_BT).compile()
    logits_BTV = multihost_utils.process_allgather(compiled(state, tokens_BT), tiled=True)

    crossing = set(axes_across_processes(mesh))
    cols = hlo.collectives(compiled, mesh)
    summary = {
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "axes_across_processes": sorted(crossing),
        "collectives": len(cols),
        "cross_process": sum(bool(crossing & set(c.axes)) for c in cols),
        "kinds": dict(
            sorted(collections.Counter(f"{c.kind}/{','.join(c.axes) or '-'}" for c in cols).items())
        ),
    }
    return np.asarray(logits_BTV), summary


def write(out: str | pathlib.Path, logits_BTV: np.ndarray, summary: dict) -> None:
    """``np.save`` the logits to ``out`` and the summary to ``out`` with suffix ``.json``."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, logits_BTV)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv):
    del argv
    if not FLAGS.out:
        sys.exit("sharded_forward: --out is required")
    distributed.initialize_from_env()
    try:
        logits_BTV, summary = sharded_forward(
            FLAGS.model,
            seed=FLAGS.seed,
            batch=FLAGS.batch,
            seq_len=FLAGS.seq_len,
            model_parallel=FLAGS.model_parallel,
            rules=FLAGS.rules,
        )
    except ValueError as e:
        sys.exit(f"sharded_forward: {e}")
    if distributed.is_primary():
        write(FLAGS.out, logits_BTV, summary)
        print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
