"""Zoology MQAR recall-vs-state study (Arora et al. 2023, arXiv:2312.04927, Figure 2, §3-4).

Trains every available family (``configs.FAMILIES``) at every width on a mixture of MQAR
tasks, scores it on each task of the study, then writes ``results.json``, ``results.md`` and
``recall_vs_state.png`` to the workdir::

    python -m research.zoology_mqar.run --workdir runs/zoology_mqar
    python -m research.zoology_mqar.run --smoke --workdir runs/zoology_mqar_smoke

Each (family, width) run trains with ``experiments.trainer``'s optimizer and jitted steps in
``WORKDIR/runs/<family>_d<width>/`` (``metrics.jsonl``) and ends by writing
``result.json`` there; the reports are rewritten after every run. Rerunning the command skips
runs that have a ``result.json`` for the same settings, so no finished run is lost (one cut
short restarts from step 0: runs last seconds to a minute).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time

from absl import app, flags, logging
from etils import epath
from flax import nnx

import models
from experiments import trainer
from experiments.data import DataConfig, make_dataset
from experiments.progress import Progress
from experiments.trainer import TrainConfig
from models.state import state_bytes
from research.zoology_mqar import configs, report
from research.zoology_mqar.configs import Family, StudyConfig, Task

FLAGS = flags.FLAGS
RESULT_FILE = "result.json"
RUNS_DIR = "runs"


def define_flags() -> None:
    """Declare the entry point's flags (at launch, not on import)."""
    flags.DEFINE_bool("smoke", False, "Run the quick variant (get_config('smoke')).")
    flags.DEFINE_string("workdir", None, "Output directory; rerun to resume.")


def decode_state_bytes(mcfg: models.ModelConfig, seq_len: int) -> int:
    """Bytes of one sequence's decode state after ``seq_len`` tokens: the KV cache for
    attention (grows with ``seq_len``), the constant recurrent state for the others."""
    model = models.abstract(mcfg)
    return state_bytes(model.init_state(1, seq_len).layers)


def _mqar(study: StudyConfig, task: Task, seed: int) -> DataConfig:
    return DataConfig(
        kind="mqar",
        seq_len=task.seq_len,
        batch_size=study.batch_size,
        vocab_size=study.vocab_size,
        num_kv_pairs=task.num_kv_pairs,
        seed=seed,
    )


def train_config(study: StudyConfig, family: Family, width: int) -> TrainConfig:
    """The ``experiments.trainer`` settings of one (family, width) run; ``data`` is the
    longest training task (``fit`` cycles through all of ``study.train_tasks``)."""
    mcfg = configs.model_config(family, width, study.vocab_size)
    overrides = {
        f.name: getattr(mcfg, f.name)
        for f in dataclasses.fields(mcfg)
        if f.name not in ("name", "source", "dtype")
    }
    longest = max(study.train_tasks, key=lambda t: t.seq_len)
    return TrainConfig(
        model=family.preset,
        model_overrides=overrides,
        data=_mqar(study, longest, study.seed),
        steps=study.steps,
        lr=study.lr(family.name),
        warmup_steps=study.warmup_steps,
        weight_decay=study.weight_decay,
        eval_batches=study.eval_batches,
        log_every=max(study.steps // 20, 1),
        seed=study.seed,
        smoke=study.smoke,
    )


def run_name(family: str, width: int) -> str:
    return f"{family}_d{width}"


def task_index(study: StudyConfig, step: int) -> int:
    """Which of ``study.train_tasks`` step ``step`` trains on: the first during the
    curriculum, then each in turn."""
    if step < study.curriculum_steps:
        return 0
    return (step - study.curriculum_steps) % len(study.train_tasks)


def fit(study: StudyConfig, cfg: TrainConfig, bar: Progress, done_steps: int, log_file):
    """Train ``cfg``'s model from scratch on the MQAR mixture ``study.train_tasks`` (the
    first ``study.curriculum_steps`` steps on ``train_tasks[0]``, then one task per step in
    turn, as Zoology trains one model on several sequence lengths; each task's stream has its
    own seed and step ``s`` takes its batch ``s``) with ``experiments.trainer``'s optimizer
    and jitted steps, then
    score it on every task of ``study.tasks``. No checkpoints: a run lasts seconds to a minute
    and a finished run's ``result.json`` is what a rerun keeps.

    Returns:
      ``{task: trainer.evaluate metrics}`` on ``cfg.eval_batches`` held-out batches each.
    """
    mcfg = trainer.model_config(cfg, study.vocab_size)
    train_sets = [
        make_dataset(_mqar(study, t, study.seed + i)) for i, t in enumerate(study.train_tasks)
    ]
    graphdef, params, rest = nnx.split(models.build(mcfg, seed=cfg.seed), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx, _ = trainer.make_optimizer(cfg)
    train_step, eval_step = trainer.make_step_fns(graphdef, tx)
    opt_state = tx.init(params)
    k = len(train_sets)
    with epath.Path(log_file).open("w") as log:
        for step in range(cfg.steps):
            batch = train_sets[task_index(study, step)].batch(step)
            params, opt_state, metrics = train_step(params, opt_state, rest, batch)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                loss = float(metrics["loss"])
                log.write(json.dumps({"step": step + 1, "split": "train", "loss": loss}) + "\n")
                bar.postfix["loss"] = loss
            bar.update(done_steps + step + 1)
    out = {}
    for task in study.tasks:
        # A data seed no training task uses: held-out sequences.
        batches = make_dataset(_mqar(study, task, study.seed + k)).eval_batches(cfg.eval_batches)
        out[task] = trainer.evaluate(eval_step, params, rest, batches, has_accuracy=True)
    return out


def run_one(study: StudyConfig, cfg: TrainConfig, family: Family, width: int, rundir, bar, done):
    """Train one (family, width) run; one result record per task of ``study.tasks``."""
    mcfg = models.get_config(cfg.model, **cfg.model_overrides)
    params = models.count_params(mcfg)
    rundir = epath.Path(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    scores = fit(study, cfg, bar, done, rundir / trainer.METRICS_FILE)
    seconds = time.perf_counter() - tic
    return [
        {
            "family": family.name,
            "preset": family.preset,
            "width": width,
            "seq_len": task.seq_len,
            "num_kv_pairs": task.num_kv_pairs,
            "num_layers": mcfg.num_layers,
            "params": params,
            "non_embedding_params": params - configs.embedding_params(mcfg),
            "state_bytes": decode_state_bytes(mcfg, task.seq_len),
            "accuracy": scores[task]["accuracy"],
            "loss": scores[task]["loss"],
            "lr": cfg.lr,
            "steps": cfg.steps,
            "train_seconds": seconds,
        }
        for task in study.tasks
    ]


def _settings(study: StudyConfig, cfg: TrainConfig) -> dict:
    """What a finished run must match to be kept: its trainer config and the tasks."""
    return json.loads(
        json.dumps(
            {
                "train_config": cfg.to_dict(),
                "train_tasks": [dataclasses.asdict(t) for t in study.train_tasks],
                "curriculum_steps": study.curriculum_steps,
                "tasks": [dataclasses.asdict(t) for t in study.tasks],
            }
        )
    )


def run_study(study: StudyConfig, workdir, *, progress: bool = True) -> dict:
    """Train every missing (family, width) run of ``study`` in ``workdir``; write the reports.

    Returns:
      The ``results.json`` content: ``config``, ``runs`` (one record per family, width and
      task: parameter counts, ``state_bytes``, final query ``accuracy``, seconds), ``skipped``
      (families missing from ``models``, with the reason).
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    families, skipped = [], []
    for name in study.families:
        why = configs.available(configs.FAMILIES[name])
        if why is None:
            families.append(configs.FAMILIES[name])
        else:
            skipped.append({"family": name, "reason": why})
    records, todo = [], []
    for width in study.widths:
        for family in families:
            cfg = train_config(study, family, width)
            file = workdir / RUNS_DIR / run_name(family.name, width) / RESULT_FILE
            done = json.loads(file.read_text()) if file.exists() else None
            if done is not None and done["settings"] == _settings(study, cfg):
                records += done["records"]
            else:
                todo.append((cfg, family, width, file))
    steps, total = study.steps, len(families) * len(study.widths)
    bar = Progress(
        total * steps, initial=(total - len(todo)) * steps, enabled=progress, desc="zoology"
    )
    for s in skipped:
        bar.write(f"skipped {s['family']}: {s['reason']}")
    bar.write(f"{total - len(todo)} of {total} runs already done in {workdir}")
    started = time.perf_counter()

    def results() -> dict:
        return {
            "paper": "Zoology, arXiv:2312.04927, Figure 2",
            "date": datetime.date.today().isoformat(),
            "config": json.loads(json.dumps(dataclasses.asdict(study))),
            "runs": sorted(records, key=lambda r: _order(study, r)),
            "skipped": skipped,
            # Compilation, training, scoring and reports of the runs this command trained.
            "seconds_this_invocation": time.perf_counter() - started,
            # Training loops of every run in the table, whichever invocation trained it.
            "train_seconds_all_runs": sum(
                {(r["family"], r["width"]): r["train_seconds"] for r in records}.values()
            ),
        }

    try:
        for i, (cfg, family, width, file) in enumerate(todo):
            done_steps = (total - len(todo) + i) * steps
            new = run_one(study, cfg, family, width, file.parent, bar, done_steps)
            file.write_text(
                json.dumps({"settings": _settings(study, cfg), "records": new}, indent=2) + "\n"
            )
            records += new
            report.write_all(results(), workdir)
            accuracies = ", ".join(f"{r['accuracy']:.3f}" for r in new)
            bar.write(
                f"{run_name(family.name, width)}: accuracy {accuracies} "
                f"({new[0]['train_seconds']:.0f} s)"
            )
    finally:
        bar.close()
    out = results()
    report.write_all(out, workdir)
    return out


def _order(study: StudyConfig, record: dict) -> tuple[int, int, int]:
    task = Task(record["seq_len"], record["num_kv_pairs"])
    return (
        study.tasks.index(task),
        study.families.index(record["family"]),
        study.widths.index(record["width"]),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        sys.exit("zoology_mqar: --workdir is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    study = configs.get_config("smoke" if FLAGS.smoke else "")
    results = run_study(study, FLAGS.workdir)
    print(report.markdown(results))
    print(
        f"wall time {results['seconds_this_invocation']:.0f} s this invocation; "
        f"training {results['train_seconds_all_runs']:.0f} s over all runs"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
