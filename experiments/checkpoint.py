"""Orbax checkpoints of training runs, and loading a trained model back.

A training workdir (written by ``experiments.trainer``) holds::

    config.json              {"train": TrainConfig dict, "model_config": ModelConfig dict}
    checkpoints/<step>/      orbax: "params" and "opt_state" (pytrees), "meta" ({"step": ...})

``load_model`` takes the workdir, its ``checkpoints`` folder or one ``checkpoints/<step>``
folder, rebuilds the model from ``config.json`` and restores its parameters::

    model, cfg = load_model("runs/tiny")              # latest step
    model, cfg = load_model("runs/tiny", step=500)
    python -m experiments.generate --checkpoint runs/tiny --prompt "def main():"

Every failure to find or read a checkpoint is a one-line ``FileNotFoundError`` or
``ValueError`` that names the path.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

import models
from models.lm import abstract

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"


def manager(directory, *, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    """A checkpoint manager over ``directory`` that keeps the newest ``keep`` steps.

    Saves are synchronous: the trainer donates the parameter buffers to the next step, so an
    asynchronous save could read freed memory.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False
    )
    # orbax requires absolute paths; resolve relative workdirs against the current directory.
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state) -> None:
    """Write ``params`` and ``opt_state`` (pytrees of arrays) as checkpoint ``step``."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": int(step)}),
        ),
    )
    mngr.wait_until_finished()


def _abstract(tree):
    """Shape/dtype/sharding of every array leaf: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _drop_closed_loop_noise() -> None:
    """Silence the echoes of a failed read.

    On the first unreadable array orbax closes its event loop while tensorstore is still
    reading the others; each of those reads then reports ``RuntimeError('Event loop is
    closed')`` to ``sys.unraisablehook`` from a tensorstore thread, possibly after the real
    error has been raised. Only that exact error is dropped; everything else passes through.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_noise", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_noise = True
    sys.unraisablehook = hook


def restore(mngr: ocp.CheckpointManager, step: int, params_like, opt_state_like=None):
    """Checkpoint ``step`` restored into the structure (and shardings) of the ``*_like`` trees.

    Returns:
      ``params`` if ``opt_state_like`` is None, else ``(params, opt_state)``.

    Raises:
      ValueError: the checkpoint is missing, incomplete or unreadable (the message names it).
    """
    items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
    if opt_state_like is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
    path = epath.Path(mngr.directory) / str(step)
    _drop_closed_loop_noise()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many types; all mean unreadable here
        raise ValueError(f"cannot read checkpoint {path}: {_one_line(e)}") from e
    if opt_state_like is None:
        return out["params"]
    return out["params"], out["opt_state"]


def resolve(path) -> tuple[epath.Path, epath.Path, int | None]:
    """``(workdir, checkpoint directory, step or None)`` for a workdir, its ``checkpoints``
    folder or one ``checkpoints/<step>`` folder."""
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if (path / CHECKPOINTS).is_dir():
        return path, path / CHECKPOINTS, None
    if path.name.isdigit():
        return path.parent.parent, path.parent, int(path.name)
    return (path if (path / CONFIG_FILE).exists() else path.parent), path, None


def read_config(workdir) -> dict[str, Any]:
    """The ``config.json`` of a training workdir."""
    file = epath.Path(workdir) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} at {file}: not a training workdir")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"unreadable {file}: {_one_line(e)}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_config"), dict):
        raise ValueError(f"{file} has no model_config")
    return config


def load_model(path, *, step: int | None = None) -> tuple[nnx.Module, models.ModelConfig]:
    """The trained model of a workdir (or of its checkpoint folder) and its config.

    Args:
      path: a training workdir, its ``checkpoints`` folder, or one ``checkpoints/<step>``.
      step: the step to load; default the latest (or the one ``path`` names).

    Returns:
      ``(model, model_config)``, parameters as trained (float32 storage).

    Raises:
      FileNotFoundError: ``path`` or ``config.json`` is missing.
      ValueError: no checkpoints, no checkpoint at ``step``, or an unreadable checkpoint.
    """
    workdir, directory, named_step = resolve(path)
    step = named_step if step is None else step
    mngr = manager(directory, create=False)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise ValueError(f"no checkpoints in {directory}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; steps: {sorted(steps)}")
        config_file = epath.Path(workdir) / CONFIG_FILE
        try:
            cfg = models.ModelConfig.from_dict(read_config(workdir)["model_config"])
        except TypeError as e:  # unknown or missing fields
            raise ValueError(f"bad model_config in {config_file}: {_one_line(e)}") from e
        graphdef, params, rest = nnx.split(abstract(cfg), nnx.Param, ...)
        if jax.tree.leaves(rest):  # non-parameter state (none in today's LM): build it for real
            graphdef, params, rest = nnx.split(models.build(cfg), nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            nnx.to_pure_dict(params),
        )
        restored = restore(mngr, step, target)
    finally:
        mngr.close()
    return nnx.merge(graphdef, restored, rest), cfg
