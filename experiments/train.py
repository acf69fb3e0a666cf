"""Train a language model from a Python run config (``experiments/configs/*.py``).

Examples::

    python -m experiments.train --config experiments/configs/dense_tiny.py:smoke \
        --workdir runs/tiny
    python -m experiments.train --config experiments/configs/dense_tiny.py --workdir runs/tiny \
        --set steps=2000 --set data.seq_len=256 --set model_overrides.num_layers=4
    python -m experiments.train --config experiments/configs/mqar_tiny.py --workdir runs/mqar \
        --set compute_dtype=bfloat16 --noprogress

``--config PATH[:ARG]`` loads the file and calls its ``get_config(ARG)``. ``--set KEY=VALUE``
(repeatable) replaces a ``TrainConfig`` field, a ``data.<field>``, or a model field via
``model_overrides.<field>``; values are parsed to the field's type (``none`` for optional
fields, Python literals for tuples and dicts). Rerun the same command to resume from the
latest checkpoint in ``--workdir``. Prints the final eval metrics as one JSON line.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import sys
import types
import typing
from collections.abc import Sequence

from absl import app, flags, logging

import models
from experiments import distributed, trainer
from experiments.trainer import TrainConfig

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declare this entry point's flags (at launch, so importing the module is free of
    global side effects and entry points can be imported together)."""
    flags.DEFINE_string("config", None, "Run config file, PATH[:ARG]; ARG goes to get_config.")
    flags.DEFINE_string("workdir", None, "Output directory (resumed if it has checkpoints).")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE override, e.g. data.seq_len=128; repeatable.")
    flags.DEFINE_bool("progress", True, "Live progress bar on a terminal.")


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def load_config(spec: str) -> TrainConfig:
    """``get_config(ARG)`` of the run-config file in ``spec`` = ``PATH[:ARG]``."""
    path, sep, arg = spec.partition(".py:")
    path = path + ".py" if sep else path
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"no run config file at {file}")
    spec_ = importlib.util.spec_from_file_location(f"_kestrel_run_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{file} defines no get_config(arg)")
    cfg = module.get_config(arg)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"{file}: get_config returned {type(cfg).__name__}, not TrainConfig")
    return cfg


def parse_value(text: str, tp, key: str):
    """``text`` parsed as type ``tp`` (from a dataclass annotation) for field ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is not type(None):
                try:
                    return parse_value(text, arg, key)
                except ValueError as e:
                    errors.append(str(e))
        raise ValueError("; ".join(errors))
    if tp is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(f"{key} expects a bool ({'/'.join(_TRUE + _FALSE)}), got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{key} expects {tp.__name__}, got {text!r}") from None
    if tp is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{key} expects a Python literal of {tp}, got {text!r}") from None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return tp(**value)
    if (origin or tp) is tuple and isinstance(value, list | tuple):
        return tuple(value)
    expected = origin or tp
    if isinstance(expected, type) and not isinstance(value, expected):
        raise ValueError(f"{key} expects {tp}, got {text!r}")
    return value


def _fields(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def valid_keys() -> list[str]:
    """Every key ``--set`` accepts."""
    data_cls = _fields(TrainConfig)["data"]
    keys = [k for k in _fields(TrainConfig) if k != "data"]
    keys += [f"data.{k}" for k in _fields(data_cls)]
    keys += [f"model_overrides.{k}" for k in _fields(models.ModelConfig)]
    return keys


def apply_overrides(cfg: TrainConfig, assignments: Sequence[str]) -> TrainConfig:
    """``cfg`` with ``KEY=VALUE`` assignments applied in order.

    Raises:
      ValueError: a malformed assignment, an unknown key (the message lists the valid keys)
        or a value that does not parse as the field's type.
    """
    for assignment in assignments:
        key, eq, text = assignment.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
        head, _, tail = key.partition(".")
        hints = _fields(TrainConfig)
        nested = {"data": _fields(hints["data"]), "model_overrides": _fields(models.ModelConfig)}
        if head not in hints or (tail and (head not in nested or tail not in nested[head])):
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
        if not tail:
            cfg = dataclasses.replace(cfg, **{key: parse_value(text, hints[key], key)})
        elif head == "data":
            value = parse_value(text, nested[head][tail], key)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{tail: value}))
        else:
            value = parse_value(text, nested[head][tail], key)
            cfg = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, tail: value})
    return cfg


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.config or not FLAGS.workdir:
        sys.exit("train: --config and --workdir are required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        distributed.initialize_from_env()
        cfg = apply_overrides(load_config(FLAGS.config), FLAGS.set)
    except (ValueError, TypeError) as e:
        sys.exit(f"train: {e}")
    result = trainer.train(cfg, FLAGS.workdir, progress=FLAGS.progress)
    if distributed.is_primary():
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
