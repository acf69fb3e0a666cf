"""Early-exit quality-vs-depth curve, self-speculative decoding, and the exit heads' training
cost, on one trained model (``experiments/configs/early_exit.py``).

Examples::

    python -m experiments.early_exit_curve --workdir runs/early_exit          # README table
    python -m experiments.early_exit_curve --workdir runs/early_exit_smoke --smoke

Trains the config first (resuming from the workdir's checkpoints), then:

Curve
  For each confidence threshold, every validation token is predicted by the first exit whose
  max probability reaches the threshold (CALM, Schuster et al., arXiv:2207.07061 §3.5), by
  the final layer otherwise; ``>= 1`` never exits. The per-exit logits come from one full
  forward (``model(tokens).exit_logits``), i.e. every token's deeper layers see the full
  model's keys and values of earlier tokens: the quality of EE-LLM's KV recomputation
  (arXiv:2312.04916 §4.2), whose cache always equals the full model's. Reported: perplexity,
  average depth (blocks run per token) and the decode tokens/s and average depth of
  ``models.generate(exit_threshold=...)`` (CALM state propagation) at that threshold.
Self-speculative decoding
  ``models.generate(draft_exit=d, draft_tokens=k)`` (LayerSkip, arXiv:2404.16710) for each exit
  depth: accepted drafts per verification and decode tokens/s against plain greedy.
Exit-head overhead
  Median time of the jitted training step of the model with its exits and of the same model
  without them (same shapes, batch and optimizer), printed as a JSON line.

Prints markdown tables and writes ``curve.json`` and ``curve.png`` in the workdir.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import models
from experiments import checkpoint, plots, trainer, workdir_cli
from experiments.configs import early_exit as curve_config
from experiments.data import make_dataset

THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
DRAFT_TOKENS = 4


define_flags = workdir_cli.define_flags


def curve(model, batches, thresholds=THRESHOLDS) -> list[dict]:
    """Perplexity and average depth of the confidence-threshold exit policy (module docstring).

    Returns:
      One ``{"threshold", "perplexity", "avg_depth"}`` per threshold, in the given order.
    """
    cfg = model.config
    depths_E = jnp.asarray((*cfg.exit_layers, cfg.num_layers), jnp.float32)
    graphdef, state = nnx.split(model)
    th_R = jnp.asarray(thresholds, jnp.float32)

    @jax.jit
    def sums(state, batch):
        out = nnx.merge(graphdef, state)(batch["inputs"])
        logits_EBTV = jnp.concatenate([out.exit_logits, out.logits[None]])
        logp_EBTV = jax.nn.log_softmax(logits_EBTV, axis=-1)
        nll_EBT = -jnp.take_along_axis(logp_EBTV, batch["targets"][None, ..., None], -1)[..., 0]
        conf_EBT = jnp.exp(logp_EBTV.max(-1))
        # hit[r, e]: exit e reaches threshold r (never for r >= 1; the final layer always).
        hit_REBT = (conf_EBT[None] >= th_R[:, None, None, None]) & (th_R < 1.0)[:, None, None, None]
        hit_REBT = hit_REBT.at[:, -1].set(True)
        first_RBT = jnp.argmax(hit_REBT, axis=1)
        nll_RBT = jnp.take_along_axis(nll_EBT[None], first_RBT[:, None], axis=1)[:, 0]
        mask_BT = batch["mask"].astype(jnp.float32)
        return (
            jnp.sum(nll_RBT * mask_BT, axis=(1, 2)),
            jnp.sum(depths_E[first_RBT] * mask_BT, axis=(1, 2)),
            mask_BT.sum(),
        )

    nll_R, depth_R, tokens = (np.zeros(len(thresholds)), np.zeros(len(thresholds)), 0.0)
    for batch in batches:
        n, d, t = jax.device_get(sums(state, batch))
        nll_R, depth_R, tokens = nll_R + n, depth_R + d, tokens + float(t)
    return [
        {"threshold": float(th), "perplexity": float(np.exp(n / tokens)), "avg_depth": d / tokens}
        for th, n, d in zip(thresholds, nll_R, depth_R, strict=True)
    ]


def _prompts(batches, count: int, length: int) -> list[list[int]]:
    rows = np.concatenate([np.asarray(b["inputs"]) for b in batches])
    return [rows[i, :length].tolist() for i in range(count)]


def _decode_speed(model, prompts, new: int, repeats: int, **options) -> dict:
    """The fastest of ``repeats`` generate calls (the first compiles)."""
    runs = [models.generate(model, prompts, max_new_tokens=new, **options) for _ in range(repeats)]
    return max(runs, key=lambda r: r.stats["decode_tokens_per_s"])


def bench_step(model_cfg: models.ModelConfig, batch, train_cfg, *, steps: int) -> dict:
    """Median seconds of the jitted training step with and without the exit heads."""
    out = {}
    tx, _ = trainer.make_optimizer(train_cfg)
    plain_cfg = model_cfg.replace(exit_layers=(), exit_loss_weights=None)
    for label, cfg in (("with_exits", model_cfg), ("without_exits", plain_cfg)):
        graphdef, params, rest = nnx.split(models.build(cfg), nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        opt_state = tx.init(params)
        train_step, _ = trainer.make_step_fns(graphdef, tx)
        times = []
        for i in range(steps + 2):  # two warm-up steps (the first compiles)
            t0 = time.perf_counter()
            params, opt_state, metrics = train_step(params, opt_state, rest, batch)
            jax.block_until_ready(metrics)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[f"{label}_s"] = statistics.median(times)
    out["overhead"] = out["with_exits_s"] / out["without_exits_s"] - 1
    return out


def run(workdir: str, *, smoke: bool) -> dict:
    cfg = curve_config.get_config("smoke" if smoke else "")
    trainer.train(cfg, pathlib.Path(workdir), progress=not smoke)
    model, model_cfg = checkpoint.load_model(workdir)
    dataset = make_dataset(cfg.data)
    batches = dataset.eval_batches(cfg.eval_batches)
    rows = curve(model, batches)
    full = rows[0]["perplexity"]
    prompts = _prompts(batches, 4, 32)
    new, repeats = (16, 1) if smoke else (96, 3)
    for row in rows:
        res = _decode_speed(model, prompts, new, repeats, exit_threshold=row["threshold"])
        row["vs_full"] = row["perplexity"] / full - 1
        row["layers_saved"] = 1 - row["avg_depth"] / model_cfg.num_layers
        row["decode_tokens_per_s"] = res.stats["decode_tokens_per_s"]
        row["generate_avg_layers"] = res.stats["avg_layers"]
    plain = _decode_speed(model, prompts, new, repeats)
    spec = []
    for depth in model_cfg.exit_layers:
        options = dict(draft_exit=depth, draft_tokens=DRAFT_TOKENS)
        res = _decode_speed(model, prompts, new, repeats, **options)
        spec.append({
            "draft_exit": depth, "draft_tokens": DRAFT_TOKENS,
            "accepted_per_verify": res.stats["accepted_per_verify"],
            "verify_passes": res.stats["verify_passes"],
            "decode_tokens_per_s": res.stats["decode_tokens_per_s"],
            "speedup": res.stats["decode_tokens_per_s"] / plain.stats["decode_tokens_per_s"],
            "same_tokens": res.tokens == plain.tokens,
        })  # fmt: skip
    bench = bench_step(model_cfg, dataset.batch(0), cfg, steps=3 if smoke else 10)
    print(json.dumps({"bench_step": bench}))
    report = {
        "model": model_cfg.to_dict(),
        "eval_tokens": int(sum(float(b["mask"].sum()) for b in batches)),
        "rows": rows,
        "plain_greedy_tokens_per_s": plain.stats["decode_tokens_per_s"],
        "speculative": spec,
        "bench_step": bench,
    }
    (pathlib.Path(workdir) / "curve.json").write_text(json.dumps(report, indent=2))
    plot_curve(rows, pathlib.Path(workdir) / "curve.png", num_layers=model_cfg.num_layers)
    print(format_table(rows))
    print()
    print(format_speculative(spec, plain.stats["decode_tokens_per_s"]))
    return report


def format_table(rows: list[dict]) -> str:
    lines = ["| threshold | avg depth (forward) | layers saved | validation perplexity | "
             "vs full depth | generate avg layers | decode tokens/s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['threshold']:.1f} | {r['avg_depth']:.3f} | "
                     f"{100 * r['layers_saved']:.1f}% | {r['perplexity']:.4f} | "
                     f"{100 * r['vs_full']:+.2f}% | {r['generate_avg_layers']:.3f} | "
                     f"{r['decode_tokens_per_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def format_speculative(spec: list[dict], plain_tps: float) -> str:
    lines = ["| draft exit | draft tokens | accepted per verify | decode tokens/s | "
             f"vs greedy ({plain_tps:.1f} tokens/s) | same tokens |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in spec:
        lines.append(f"| {s['draft_exit']} | {s['draft_tokens']} | "
                     f"{s['accepted_per_verify']:.3f} | {s['decode_tokens_per_s']:.1f} | "
                     f"{s['speedup']:.2f}x | {s['same_tokens']} |")  # fmt: skip
    return "\n".join(lines)


def plot_curve(rows: list[dict], path, *, num_layers: int) -> None:
    """PNG of validation perplexity against average depth, one point per threshold."""
    fig = plots.figure()
    ax = fig.add_subplot()
    depth = [r["avg_depth"] for r in rows]
    ax.plot(depth, [r["perplexity"] for r in rows], "o-", markersize=4)
    for r in rows:
        ax.annotate(f"{r['threshold']:.1f}", (r["avg_depth"], r["perplexity"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.axvline(0.7 * num_layers, color="gray", linestyle=":", label="30% fewer layers")
    ax.axhline(1.05 * rows[0]["perplexity"], color="gray", linestyle="--", label="+5% perplexity")
    ax.set_xlabel("average depth (blocks per token)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("early exit: quality vs depth (labels: confidence threshold)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    plots.save_png(fig, path)


main = workdir_cli.make_main("early_exit_curve", run)


if __name__ == "__main__":
    define_flags()
    app.run(main)
