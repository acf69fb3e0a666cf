"""Train a language model: AdamW with linear warmup and cosine decay, global-norm clipping,
masked cross-entropy, periodic eval, orbax checkpoints and exact resume.

    from experiments import trainer
    from experiments.data import DataConfig

    cfg = trainer.TrainConfig(
        model="dense-tiny", data=DataConfig(kind="stdlib", seq_len=128, batch_size=16), steps=500
    )
    result = trainer.train(cfg, "runs/tiny")  # final eval metrics and "history"

From the command line (run configs in ``experiments/configs/``)::

    python -m experiments.train --config experiments/configs/dense_tiny.py:smoke --workdir runs/t

The workdir ends up holding ``config.json`` (this config and the model config),
``metrics.jsonl`` (one JSON record per log event, ``"split"`` = ``"train"`` or ``"eval"``),
``checkpoints/<step>/`` (params, optimizer state, step) and ``loss_curve.png``.

Steps count completed updates: update ``s`` (1-based) trains on ``data.batch(s - 1)``. A batch
depends only on ``(seed, step)`` and a checkpoint holds everything else, so rerunning on the
same workdir resumes from the latest checkpoint and reproduces the uninterrupted run exactly
(the learning-rate schedule depends on ``steps``: change it and the rest of the schedule
changes). On an exception or Ctrl-C inside the loop the last completed step is saved first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import models
from experiments import checkpoint, distributed, plots
from experiments.data import DataConfig, make_dataset
from experiments.progress import Progress
from models.early_exit import exit_loss
from partitioning import rules as partition_rules

COMPUTE_DTYPES = ("float32", "bfloat16")
SYNTHETIC_KINDS = ("mqar", "copying")
METRICS_FILE = "metrics.jsonl"
SHARDING_REPORT_FILE = "sharding_report.txt"
# Model fields a resumed run may change: they do not touch the parameters.
COMPUTE_ONLY = ("dtype", "attention_impl", "attention_interpret")
LOSS_CURVE_FILE = "loss_curve.png"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.

    Attributes:
      model: a preset name of ``models.get_config``; ``model_overrides`` replaces its fields.
        For synthetic tasks the vocabulary is set to the task's unless overridden.
      data: what to train and evaluate on (``experiments.data``).
      steps: total optimizer updates.
      lr, warmup_steps, min_lr_ratio: peak learning rate, linear warmup from 0, then cosine
        decay to ``lr * min_lr_ratio`` at ``steps``.
      weight_decay, b1, b2: AdamW; weight decay applies to matrices only (not norms, biases).
      grad_clip: global-norm clip applied before AdamW.
      compute_dtype: activations' dtype (the model config's ``dtype``); parameters, the loss
        and the optimizer state stay float32.
      eval_every, eval_batches: eval cadence (and at the last step) over fixed batches.
      checkpoint_every, keep_checkpoints: save cadence (and at the last step) and how many
        checkpoints to keep.
      log_every: a train record (means over the steps since the last one) every this many.
      seed: parameter initialisation seed (the data seed is ``data.seed``).
      sharding, model_parallel: weight layout, a ``partitioning.rules`` preset, over a mesh of
        ``model_parallel`` devices per replica (``experiments.distributed.train_mesh``).
      init_from: a training workdir (or checkpoint) whose weights start this run: the same
        model's weights are copied, a dense model's are sparsely upcycled into this run's MoE
        layers (``models.upcycle``: every expert a copy of the dense MLP, new routers).
        Ignored when the workdir has a checkpoint to resume.
      smoke: this is a run config's ``smoke`` variant (recorded, changes nothing here).
    """

    model: str = "dense-tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: DataConfig
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    compute_dtype: str = "float32"
    eval_every: int = 200
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    seed: int = 0
    sharding: str = "data_parallel"
    model_parallel: int = 1
    init_from: str | None = None
    smoke: bool = False

    def __post_init__(self):
        partition_rules.get_rules(self.sharding)  # unknown presets list the valid ones
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unknown compute_dtype {self.compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}"
            )
        for name in ("steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_batches < 0 or self.weight_decay < 0:
            raise ValueError("eval_batches and weight_decay must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        overrides = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d["model_overrides"].items()
        }
        return cls(**{**d, "model_overrides": overrides, "data": DataConfig(**d["data"])})


def model_config(cfg: TrainConfig, data_vocab_size: int) -> models.ModelConfig:
    """The model config of ``cfg``: preset, overrides, compute dtype, task vocabulary.

    Raises:
      ValueError: the vocabulary is smaller than the data's or ``seq_len`` exceeds the
        model's ``max_seq_len``.
    """
    overrides = dict(cfg.model_overrides)
    if overrides.get("dtype", cfg.compute_dtype) != cfg.compute_dtype:
        raise ValueError("set the compute dtype with compute_dtype, not model_overrides['dtype']")
    overrides["dtype"] = cfg.compute_dtype
    if cfg.data.kind in SYNTHETIC_KINDS:
        overrides.setdefault("vocab_size", data_vocab_size)
    mcfg = models.get_config(cfg.model, **overrides)
    if mcfg.vocab_size < data_vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} < data vocab_size {data_vocab_size}")
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} > model max_seq_len {mcfg.max_seq_len}")
    return mcfg


def token_nll(logits_BTV, targets_BT):
    """Negative log-likelihood of each target token, float32 [B, T]."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT):
    """Mean next-token cross-entropy over the positions where ``mask_BT`` is 1.

    Args:
      logits_BTV: [B, T, V] (any float dtype; computed in float32).
      targets_BT: int [B, T].
      mask_BT: float [B, T] weights, usually 0/1.

    Returns:
      float32 scalar, ``sum(mask * nll) / max(sum(mask), 1)``.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(token_nll(logits_BTV, targets_BT) * mask_BT) / jnp.maximum(mask_BT.sum(), 1.0)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW (decay on >= 2-D parameters), and the lr schedule."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )
    return tx, schedule


def _logits(out):
    """Logits of a model output: the array itself or an output object's ``.logits``."""
    return out.logits if hasattr(out, "logits") else out


def make_step_fns(graphdef, tx: optax.GradientTransformation):
    """Jitted ``train_step(params, opt_state, rest, batch)`` (donates params and opt_state)
    and ``eval_step(params, rest, batch)`` over pure pytrees of arrays.

    ``params`` is ``nnx.to_pure_dict`` of the model's ``nnx.Param`` state and ``rest`` the
    other state; ``nnx.merge(graphdef, params, rest)`` rebuilds the model inside the trace.
    """

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        out = model(batch["inputs"])
        loss = masked_cross_entropy(_logits(out), batch["targets"], batch["mask"])
        objective, metrics = loss, {"loss": loss}
        if getattr(out, "exit_logits", None) is not None:  # early-exit heads
            objective, exit_metrics = exit_loss(out, batch["targets"], batch["mask"], model.config)
            metrics.update(exit_metrics, exit_loss=objective)
        aux = getattr(out, "aux_loss", None)  # MoE router losses, already weighted
        if aux is None:
            return objective, metrics
        # The gradient is of cross-entropy + aux; the logged "loss" stays the cross-entropy,
        # comparable with eval and with dense models.
        return objective + aux, {**metrics, "aux_loss": aux}

    def train_step(params, opt_state, rest, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    def eval_step(params, rest, batch):
        logits_BTV = _logits(nnx.merge(graphdef, params, rest)(batch["inputs"]))
        mask_BT = batch["mask"].astype(jnp.float32)
        correct_BT = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
        return {
            "nll": jnp.sum(token_nll(logits_BTV, batch["targets"]) * mask_BT),
            "tokens": mask_BT.sum(),
            "correct": jnp.sum(correct_BT * mask_BT),
        }

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)


_OPTIMIZER_FIELDS = (
    "steps",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "b1",
    "b2",
)


@functools.lru_cache(maxsize=4)
def _cached_step_fns(graphdef, optimizer: tuple):
    """``make_step_fns`` per (model structure, optimizer hyperparameters): repeated runs in
    one process (a notebook, the tests) reuse the compiled steps."""
    hparams = dict(zip(_OPTIMIZER_FIELDS, optimizer, strict=True))
    tx, schedule = make_optimizer(types.SimpleNamespace(**hparams))
    return tx, schedule, *make_step_fns(graphdef, tx)


def evaluate(
    eval_step, params, rest, batches: list[dict], *, has_accuracy: bool
) -> dict[str, float]:
    """Token-weighted loss, perplexity and (if ``has_accuracy``) accuracy over ``batches``."""
    sums = [eval_step(params, rest, batch) for batch in batches]
    total = {k: float(np.sum([s[k] for s in jax.device_get(sums)])) for k in sums[0]}
    loss = total["nll"] / max(total["tokens"], 1.0)
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))), "tokens": total["tokens"]}
    if has_accuracy:
        out["accuracy"] = total["correct"] / max(total["tokens"], 1.0)
    return out


class MetricsLog:
    """``metrics.jsonl``: records up to ``keep_through`` kept from an earlier run, the rest
    dropped (they belong to steps that will be recomputed), then appended one line at a time.
    ``path=None`` keeps the records in memory only (processes other than the primary)."""

    def __init__(self, path, *, keep_through: int):
        self.records: list[dict] = []
        self._file = None
        if path is None:
            return
        self.path = epath.Path(path)
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when an earlier run was killed
                if record["step"] <= keep_through:
                    self.records.append(record)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def split(self, name: str) -> list[dict]:
        return [r for r in self.records if r["split"] == name]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _write_config(workdir: epath.Path, cfg: TrainConfig, mcfg: models.ModelConfig) -> None:
    """Write ``config.json``; a resumed run must keep the model its checkpoints hold."""
    file = workdir / checkpoint.CONFIG_FILE
    config = json.loads(json.dumps({"train": cfg.to_dict(), "model_config": mcfg.to_dict()}))
    if file.exists() and (workdir / checkpoint.CHECKPOINTS).exists():
        old = json.loads(file.read_text()).get("model_config", {})
        new = config["model_config"]
        changed = sorted(k for k in new if k not in COMPUTE_ONLY and old.get(k) != new[k])
        if changed:
            raise ValueError(
                f"{workdir} holds checkpoints of a different model (fields {changed} differ); "
                "use a new workdir"
            )
    file.write_text(json.dumps(config, indent=2) + "\n")


def train(cfg: TrainConfig, workdir, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) ``cfg`` in ``workdir``.

    Args:
      cfg: the run.
      workdir: output directory (created); a latest checkpoint there is resumed from.
      progress: a live progress bar on a terminal (plain periodic lines otherwise).

    Returns:
      The final eval metrics (``step``, ``loss``, ``perplexity``, ``accuracy`` for tasks that
      have it) and ``history``: ``{"train": [records], "eval": [records]}`` as in
      ``metrics.jsonl``.
    """
    workdir = epath.Path(workdir)
    primary = distributed.is_primary()
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(cfg.data)
    mcfg = model_config(cfg, dataset.vocab_size)
    if primary:
        _write_config(workdir, cfg, mcfg)
    model = models.build(mcfg, seed=cfg.seed) if cfg.init_from is None else initial_model(cfg, mcfg)
    mesh = distributed.train_mesh(cfg.data.batch_size, cfg.model_parallel)
    rules = partition_rules.get_rules(cfg.sharding)
    report = partition_rules.sharding_report(model, mesh, rules)
    if primary:
        (workdir / SHARDING_REPORT_FILE).write_text(partition_rules.format_report(report) + "\n")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
    params = nnx.to_pure_dict(params)
    optimizer = tuple(getattr(cfg, name) for name in _OPTIMIZER_FIELDS)
    tx, schedule, train_step, eval_step = _cached_step_fns(graphdef, optimizer)
    params, opt_state, rest = _place(params, logical, rest, tx, mesh, rules)

    mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINTS, keep=cfg.keep_checkpoints)
    start = mngr.latest_step() or 0
    bar = Progress(cfg.steps, initial=start, enabled=progress and primary)
    if primary:
        per_device = sum(r.bytes_per_device for r in report)
        bar.write(
            f"mesh {dict(mesh.shape)}, {cfg.sharding}: {per_device:,} parameter bytes per "
            f"device (details in {SHARDING_REPORT_FILE})"
        )
    try:
        if start > cfg.steps:
            raise ValueError(f"{workdir} has a checkpoint at step {start}, past steps={cfg.steps}")
        if start:
            params, opt_state = checkpoint.restore(mngr, start, params, opt_state)
            bar.write(f"resumed from {workdir / checkpoint.CHECKPOINTS / str(start)}")
        log = MetricsLog(workdir / METRICS_FILE if primary else None, keep_through=start)
        try:
            steps = (train_step, eval_step, schedule)
            _loop(cfg, dataset, mesh, params, opt_state, rest, steps, start, mngr, log, bar)
        finally:
            log.close()
    finally:
        bar.close()
        mngr.close()
    if primary:
        plots.plot_loss_curve(
            log.records, workdir / LOSS_CURVE_FILE, title=f"{mcfg.name} on {cfg.data.kind}"
        )
    evals = log.split("eval")
    final = {k: v for k, v in evals[-1].items() if k != "split"} if evals else {}
    return {"step": cfg.steps, **final, "history": {"train": log.split("train"), "eval": evals}}


def initial_model(cfg: TrainConfig, mcfg: models.ModelConfig) -> nnx.Module:
    """The model ``cfg.init_from`` gives for ``mcfg``: the same weights, or a dense model
    upcycled into ``mcfg``'s MoE layers.

    Raises:
      ValueError: the source's model is neither ``mcfg`` nor its dense counterpart (the
        message names the fields that differ).
    """
    source, scfg = checkpoint.load_model(cfg.init_from)
    same = {k: getattr(mcfg, k) for k in (*COMPUTE_ONLY, "name")}
    moe_layers = [i for i in range(mcfg.num_layers) if mcfg.channel(i) == "moe"]
    if moe_layers and "moe" not in scfg.channel_pattern:
        keep = ("moe_dispatch", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
                "moe_impl", "moe_interpret")  # fmt: skip
        source = models.upcycle(
            source,
            num_experts=mcfg.num_experts,
            experts_per_token=mcfg.experts_per_token,
            layers=moe_layers,
            seed=cfg.seed,
            **{k: getattr(mcfg, k) for k in keep},
        )
        scfg = source.config
    if scfg.replace(**same) == mcfg:
        model = models.build(mcfg, seed=cfg.seed)  # this run's dtypes, the source's weights
        nnx.update(model, nnx.state(source, nnx.Param))
        return model
    differ = sorted(
        f.name
        for f in dataclasses.fields(mcfg)
        if f.name not in same and getattr(scfg, f.name) != getattr(mcfg, f.name)
    )
    raise ValueError(
        f"init_from={cfg.init_from} holds a {scfg.name} model that is neither this run's "
        f"model nor its dense counterpart; fields that differ: {differ}"
    )


def _place(params, logical, rest, tx, mesh, rules):
    """Lay out parameters by their logical axes; the optimizer state follows its parameter.

    Adam's moments mirror the parameter tree, so each optimizer-state leaf takes the sharding
    of the parameter whose path ends its own path (scalars such as the step count replicate).
    """
    specs = jax.tree.map(
        lambda x, axes: partition_rules.spec_for(x.shape, tuple(axes), rules, mesh),
        params,
        logical,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    params = distributed.place(params, specs, mesh)
    by_path = {path: x.sharding for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(path, leaf):
        for k in range(len(path)):
            if path[k:] in by_path:
                return by_path[path[k:]]
        return replicated

    shapes = jax.eval_shape(tx.init, params)
    out = jax.tree_util.tree_map_with_path(sharding_of, shapes)
    opt_state = jax.jit(tx.init, out_shardings=out)(params)
    return params, opt_state, distributed.replicate(rest, mesh)


def _loop(cfg, dataset, mesh, params, opt_state, rest, steps, start, mngr, log, bar) -> None:
    """Steps ``start + 1 .. cfg.steps`` with logging, eval and checkpoints."""
    train_step, eval_step, schedule = steps
    eval_data = [distributed.shard_batch(b, mesh) for b in dataset.eval_batches(cfg.eval_batches)]
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    pending: list[dict] = []  # device metrics of the steps since the last train record
    window = [start, time.perf_counter()]  # first step and start time of the timing window

    def log_train(step: int) -> None:
        values = jax.device_get(pending)
        elapsed = max(time.perf_counter() - window[1], 1e-9)
        record = {"step": step, "split": "train"}
        record.update({k: float(np.mean([v[k] for v in values])) for k in values[0]})
        record["lr"] = float(schedule(step - 1))
        record["steps_per_s"] = (step - window[0]) / elapsed
        record["tokens_per_s"] = (step - window[0]) * tokens_per_step / elapsed
        log.write(record)
        bar.postfix["loss"] = record["loss"]
        pending.clear()
        window[:] = [step, time.perf_counter()]

    def run_eval(step: int) -> None:
        if eval_data:
            metrics = evaluate(
                eval_step, params, rest, eval_data, has_accuracy=dataset.has_accuracy
            )
            log.write({"step": step, "split": "eval", **metrics})

    step, saved = start, start
    try:
        for s in range(start, cfg.steps):
            batch = distributed.shard_batch(dataset.batch(s), mesh)
            # One assignment: an interrupt lands before or after it, never between the step
            # count and the states.
            step, (params, opt_state, metrics) = s + 1, train_step(params, opt_state, rest, batch)
            pending.append(metrics)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_train(step)
            bar.update(step)
            tic = time.perf_counter()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                run_eval(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint.save(mngr, step, params, opt_state)
                saved = step
            window[1] += time.perf_counter() - tic  # eval and saving are not throughput
    except BaseException:
        if step > saved:
            _save_on_failure(mngr, step, params, opt_state, bar, log_train if pending else None)
        raise
    evals = log.split("eval")
    if eval_data and (not evals or evals[-1]["step"] != cfg.steps):
        run_eval(cfg.steps)  # a finished run resumed after its final eval was dropped


def _save_on_failure(mngr, step: int, params, opt_state, bar: Progress, flush) -> None:
    """Checkpoint the last completed step while an exception propagates."""
    try:
        if any(x.is_deleted() for x in jax.tree.leaves((params, opt_state))):
            bar.write(f"not saved: step {step + 1} was interrupted after donating step {step}")
            return
        if flush is not None:
            flush(step)
        checkpoint.save(mngr, step, params, opt_state)
        bar.write(f"stopped: saved step {step} to {epath.Path(mngr.directory) / str(step)}")
    except Exception as e:  # the original exception matters more
        bar.write(f"could not save step {step} after the failure: {e!r}")
