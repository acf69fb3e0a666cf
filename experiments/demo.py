"""`make demo`: train a small LM on the embedded corpus, generate, report efficiency.

Examples::

    python -m experiments.demo --workdir runs/demo
    python -m experiments.demo --workdir runs/demo_smoke --smoke

Steps: train ``experiments/configs/demo.py`` (resuming if the workdir has checkpoints), load
the checkpoint, continue a prompt, then benchmark prefill and decode at batch 1 and 8. Writes
``report.json`` and ``loss_curve.png`` into the workdir and prints the report as a table.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags, logging

import models
from experiments import benchmark, checkpoint, trainer
from experiments.configs import demo as demo_config
from experiments.tokenizer import ByteTokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declare this entry point's flags (at launch, so importing the module is free of
    global side effects and entry points can be imported together)."""
    flags.DEFINE_string("workdir", "runs/demo", "Output directory (resumed if it has checkpoints).")
    flags.DEFINE_bool("smoke", False, "Tiny variant for tests.")
    flags.DEFINE_string("prompt", "def fibonacci(n):\n", "Prompt to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")


BATCHES = (1, 8)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def format_table(records: list[dict]) -> str:
    """The efficiency report as an aligned text table."""
    head = ("phase", "batch", "tokens/s", "ms/token", "params", "KV cache", "roofline", "bound")
    rows = [
        (
            r["phase"],
            str(r["batch"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['ms_per_token']:.3f}",
            _bytes(r["param_bytes"]),
            _bytes(r["kv_bytes"]),
            f"{r['roofline_fraction']:.1%}",
            r["bound"],
        )
        for r in records
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [
        "  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(workdir: str, *, smoke: bool, prompt: str, max_new_tokens: int) -> dict:
    """The whole demo; returns the report it writes to ``workdir/report.json``."""
    workdir_path = pathlib.Path(workdir)
    t0 = time.perf_counter()
    cfg = demo_config.get_config("smoke" if smoke else "")
    print(f"== training {cfg.model} for {cfg.steps} steps into {workdir_path}", flush=True)
    metrics = trainer.train(cfg, workdir_path)
    train_s = time.perf_counter() - t0

    model, model_cfg = checkpoint.load_model(workdir_path)
    tok = ByteTokenizer()
    out = models.generate(
        model,
        [tok.encode(prompt)],
        max_new_tokens=max_new_tokens,
        temperature=0.6,
        top_k=20,
        seed=0,
        stop_tokens=[tok.EOS],
    )
    sample = prompt + tok.decode(out.tokens[0])
    print(f"\n== sample (temperature 0.6, top-k 20)\n{sample}\n", flush=True)

    chip = benchmark.device_roofline()
    records = []
    for batch in BATCHES:
        records += benchmark.bench_generate(
            model,
            batch=batch,
            prompt_len=64,
            new_tokens=64,
            repeats=3,
            chip=chip,
            label=model_cfg.name,
        )
    print(
        f"== efficiency on {chip.name} (peak {max(chip.peak_flops.values()) / 1e9:,.0f} GFLOP/s, "
        f"{chip.hbm_bandwidth / 1e9:.1f} GB/s)\n{format_table(records)}\n",
        flush=True,
    )
    report = {
        "model": model_cfg.to_dict(),
        "parameters": models.count_params(model_cfg),
        "train": {k: v for k, v in metrics.items() if k != "history"},
        "train_seconds": train_s,
        "sample": sample,
        "generation_stats": out.stats,
        "device": {
            "name": chip.name,
            "peak_flops": chip.peak_flops,
            "hbm_bandwidth": chip.hbm_bandwidth,
        },
        "benchmarks": records,
        "loss_curve": str(workdir_path / trainer.LOSS_CURVE_FILE),
    }
    (workdir_path / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"== wrote {workdir_path / 'report.json'} and {report['loss_curve']} "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    return report


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        run(
            FLAGS.workdir,
            smoke=FLAGS.smoke,
            prompt=FLAGS.prompt,
            max_new_tokens=FLAGS.max_new_tokens,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"demo: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
