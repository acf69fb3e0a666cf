"""Generate a continuation of a text prompt from a trained checkpoint (byte-level models).

Examples::

    python -m experiments.generate --checkpoint runs/demo --prompt "def fibonacci(n):"
    python -m experiments.generate --checkpoint runs/demo --prompt "import os" \
        --temperature 0.8 --top_p 0.95 --max_new_tokens 200
    python -m experiments.generate --checkpoint runs/demo --prompt "a" --prompt "b" \
        --plan auto      # shard over every device by the planner's best decode layout
"""

from __future__ import annotations

import functools
import json
import sys

from absl import app, flags

import models
from experiments.tokenizer import ByteTokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declare this entry point's flags (at launch, so importing the module is free of
    global side effects and entry points can be imported together)."""
    flags.DEFINE_string("checkpoint", None, "Training workdir or checkpoint directory.")
    flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for a batch.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
    flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("stats", True, "Print generation statistics as JSON to stderr.")
    flags.DEFINE_enum(
        "plan",
        "none",
        ["none", "auto"],
        "auto: lay the model over every device by partitioning.planner's best decode plan.",
    )


def run(
    checkpoint: str, prompts: list[str], *, plan: str = "none", **options
) -> tuple[list[str], dict]:
    """Load ``checkpoint``; return the decoded continuation of each prompt and the stats.

    ``plan="auto"`` shards the model over every device by the planner's best decode plan
    for this batch and length (the stats then name it).
    """
    from experiments.checkpoint import load_model

    model, _ = load_model(checkpoint)
    tok = ByteTokenizer()
    ids = tok.encode_batch(prompts)
    gen = functools.partial(models.generate, stop_tokens=[tok.EOS], **options)
    if plan == "none":
        result = gen(model, ids)
    elif plan == "auto":
        from partitioning import planner

        context = max(len(p) for p in ids) + options.get("max_new_tokens", 128)
        best = planner.auto(model.config, phase="decode", batch=len(ids), context=context)
        print(planner.summary(best), file=sys.stderr)
        with planner.use(best, model):
            result = gen(model, ids)
        result.stats["plan"] = best.to_json()
    else:
        raise ValueError(f"unknown plan {plan!r}; valid: none, auto")
    return [tok.decode(t) for t in result.tokens], result.stats


def main(argv):
    del argv
    if not FLAGS.checkpoint or not FLAGS.prompt:
        sys.exit("generate: --checkpoint and --prompt are required")
    try:
        texts, stats = run(
            FLAGS.checkpoint,
            FLAGS.prompt,
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            plan=FLAGS.plan,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"generate: {e}")
    for prompt, text in zip(FLAGS.prompt, texts, strict=True):
        print(prompt + text)
    if FLAGS.stats:
        print(json.dumps(stats), file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
