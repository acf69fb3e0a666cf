"""Quantization quality table: validation perplexity of one trained model, unquantized and
under every post-training quantization recipe (``models.quantize``).

Examples::

    python -m experiments.quant_quality --workdir runs/quant_quality          # README table
    python -m experiments.quant_quality --workdir runs/quant_quality_smoke --smoke

Trains ``experiments/configs/quant_quality.py`` first (resuming from the workdir's
checkpoints), then evaluates the float32 model and each recipe on the same fixed validation
batches of the held-out split. Prints a markdown table and writes ``quality.json``. Byte
counts are those of the linear layers' storage (``models.layer_bytes``); embeddings and norms
stay float32 in every row.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import models
from experiments import checkpoint, trainer, workdir_cli
from experiments.configs import quant_quality as quality_config
from experiments.data import make_dataset
from experiments.progress import Progress

# (label, recipe); None is the unquantized model.
RECIPES = [
    ("float32", None),
    ("int8 weights, per channel", models.QuantRecipe("int8")),
    ("int4 weights, group 128", models.QuantRecipe("int4", group_size=128)),
    ("int4 weights, group 128, 8 outlier channels", models.QuantRecipe(
        "int4", group_size=128, outlier_channels=8)),
    ("fp8 e4m3 weights, per channel", models.QuantRecipe("fp8")),
    ("W8A8 int8 (per-row activation scales)", models.QuantRecipe("int8", activations="int8")),
    ("W8A8 fp8", models.QuantRecipe("fp8", activations="fp8")),
]  # fmt: skip


define_flags = workdir_cli.define_flags


def perplexity(model, batches) -> float:
    """Token-weighted validation perplexity of ``model`` over ``batches``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, batch):
        logits = trainer._logits(nnx.merge(graphdef, state)(batch["inputs"]))
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(trainer.token_nll(logits, batch["targets"]) * mask), mask.sum()

    sums = np.asarray([jax.device_get(nll(state, b)) for b in batches], np.float64)
    return float(np.exp(sums[:, 0].sum() / sums[:, 1].sum()))


def chunked_perplexity(model, batches, chunk: int) -> float:
    """Perplexity with the sequence fed ``chunk`` tokens at a time through the decode state:
    every chunk after the first reads the keys and values of all earlier positions (and its
    own) back from the model's KV cache, so a quantized cache shows in the loss."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, batch):
        lm = nnx.merge(graphdef, state)
        inputs = batch["inputs"]
        B, T = inputs.shape
        cache = lm.init_state(B, T)
        logits = []
        for c in range(0, T, chunk):
            logits_c, cache = lm.step(inputs[:, c : c + chunk], cache, fresh=c == 0)
            logits.append(logits_c)
        logits = jnp.concatenate(logits, axis=1)
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(trainer.token_nll(logits, batch["targets"]) * mask), mask.sum()

    sums = np.asarray([jax.device_get(nll(state, b)) for b in batches], np.float64)
    return float(np.exp(sums[:, 0].sum() / sums[:, 1].sum()))


def with_kv_cache(model, model_cfg, kv_cache_dtype):
    """The same weights in a model whose KV cache is ``kv_cache_dtype``."""
    rebuilt = models.build(dataclasses.replace(model_cfg, kv_cache_dtype=kv_cache_dtype))
    nnx.update(rebuilt, nnx.state(model))
    return rebuilt


def linear_bytes(model) -> int:
    return int(sum(models.layer_bytes(model).values()))


def run(workdir: str, *, smoke: bool) -> list[dict]:
    cfg = quality_config.get_config("smoke" if smoke else "")
    trainer.train(cfg, pathlib.Path(workdir))
    model, model_cfg = checkpoint.load_model(workdir)
    batches = make_dataset(cfg.data).eval_batches(cfg.eval_batches)
    rows = []
    bar = Progress(total=len(RECIPES), desc="recipes", interval_s=0.0)
    for i, (label, recipe) in enumerate(RECIPES, 1):
        quantized = model if recipe is None else models.quantize(model, recipe)
        rows.append({"recipe": label, "perplexity": perplexity(quantized, batches),
                     "linear_bytes": linear_bytes(quantized)})  # fmt: skip
        bar.update(i, ppl=rows[-1]["perplexity"])
    bar.close()
    # The KV cache rows: the float model read through its cache in chunks, float vs int8.
    for label, kv_dtype in [
        ("float32, KV cache read back in chunks of 32", None),
        ("int8 KV cache (per token and head), chunks of 32", "int8"),
    ]:
        cached = with_kv_cache(model, model_cfg, kv_dtype)
        rows.append({"recipe": label, "perplexity": chunked_perplexity(cached, batches, 32),
                     "linear_bytes": linear_bytes(cached)})  # fmt: skip
    base = rows[0]
    for row in rows:
        row["vs_float"] = row["perplexity"] / base["perplexity"] - 1
        row["bytes_vs_float"] = row["linear_bytes"] / base["linear_bytes"]
    report = {"model": model_cfg.to_dict(), "eval_tokens": int(sum(
        float(b["mask"].sum()) for b in batches)), "rows": rows}  # fmt: skip
    (pathlib.Path(workdir) / "quality.json").write_text(json.dumps(report, indent=2))
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| recipe | linear-layer bytes | validation perplexity | vs float32 |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['linear_bytes']:,} ({r['bytes_vs_float']:.2f}x) | "
                     f"{r['perplexity']:.4f} | {100 * r['vs_float']:+.2f}% |")  # fmt: skip
    return "\n".join(lines)


main = workdir_cli.make_main("quant_quality", run)


if __name__ == "__main__":
    define_flags()
    app.run(main)
