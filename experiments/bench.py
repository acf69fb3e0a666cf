"""Benchmark prefill and decode of a preset or a checkpoint; prints one JSON line per record.

Examples::

    python -m experiments.bench --model dense-tiny --batch 1,16
    python -m experiments.bench --model dense-110m --batch 1,16 --prompt_len 128 \
        --new_tokens 64 --hf              # also Hugging Face transformers on the same weights
    python -m experiments.bench --checkpoint runs/demo --batch 1,8
    python -m experiments.bench --model tinyllama-1.1b --dtype bfloat16 --batch 1,32  # GPU
    python -m experiments.bench --model moe-tiny --set moe_dispatch=capacity   # MoE dispatch
    python -m experiments.bench --model dense-110m --batch 8 --plan auto   # every device,
                                  # laid out by the planner; predicted vs measured step times

Each record carries parameter and KV bytes and the achieved fraction of the device's roofline
(see ``experiments.benchmark``).
"""

from __future__ import annotations

import json
import sys
import typing

from absl import app, flags

import models
from experiments import benchmark

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declare this entry point's flags (at launch, so importing the module is free of
    global side effects and entry points can be imported together)."""
    flags.DEFINE_string("model", "dense-tiny", "Preset name (ignored with --checkpoint).")
    flags.DEFINE_string("checkpoint", None, "A training workdir or checkpoint directory.")
    flags.DEFINE_list("batch", ["1", "16"], "Batch sizes.")
    flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence.")
    flags.DEFINE_integer("new_tokens", 64, "Generated tokens per sequence.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
    flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
    flags.DEFINE_bool("hf", False, "Also time Hugging Face transformers on the same weights.")
    flags.DEFINE_integer("seed", 0, "Weights and prompt seed.")
    flags.DEFINE_integer(
        "prefill_chunk", None, "Prefill long prompts in pieces of this many tokens."
    )
    flags.DEFINE_multi_string(
        "set", [], "Model field override FIELD=VALUE (repeatable), e.g. moe_dispatch=capacity."
    )
    flags.DEFINE_enum(
        "plan",
        "none",
        ["none", "auto"],
        "auto: shard over every device by the planner's best decode plan and report the "
        "predicted step times beside the measured ones.",
    )


def model_overrides(assignments) -> dict:
    """``FIELD=VALUE`` strings parsed to ``ModelConfig`` field values (``experiments.train``'s
    parser); unknown fields list the valid ones."""
    from experiments import train

    hints = typing.get_type_hints(models.ModelConfig)
    out = {}
    for assignment in assignments:
        key, eq, text = assignment.partition("=")
        key = key.strip()
        if not eq or key not in hints:
            raise ValueError(
                f"--set expects FIELD=VALUE with a ModelConfig field, got {assignment!r}; "
                f"fields: {', '.join(hints)}"
            )
        out[key] = train.parse_value(text, hints[key], key)
    return out


def _load_model():
    if FLAGS.checkpoint:
        from experiments import checkpoint

        model, _ = checkpoint.load_model(FLAGS.checkpoint)
        return model
    overrides = model_overrides(FLAGS.set)
    cfg = models.get_config(FLAGS.model, param_dtype=FLAGS.dtype, dtype=FLAGS.dtype, **overrides)
    needed = FLAGS.prompt_len + FLAGS.new_tokens
    if cfg.max_seq_len < needed:
        raise ValueError(f"{cfg.name} has max_seq_len {cfg.max_seq_len} < {needed}")
    return models.build(cfg, seed=FLAGS.seed)


def main(argv):
    del argv
    try:
        batches = [int(b) for b in FLAGS.batch]
        model = _load_model()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"bench: {e}")
    chip = benchmark.device_roofline()
    for batch in batches:
        bench = benchmark.bench_planned if FLAGS.plan == "auto" else benchmark.bench_generate
        records = bench(
            model,
            batch=batch,
            prompt_len=FLAGS.prompt_len,
            new_tokens=FLAGS.new_tokens,
            repeats=FLAGS.repeats,
            chip=chip,
            seed=FLAGS.seed,
            **({"prefill_chunk": FLAGS.prefill_chunk} if FLAGS.plan != "auto" else {}),
        )
        if FLAGS.hf:
            records += benchmark.bench_hf_generate(
                model,
                batch=batch,
                prompt_len=FLAGS.prompt_len,
                new_tokens=FLAGS.new_tokens,
                repeats=FLAGS.repeats,
                seed=FLAGS.seed,
            )
        for record in records:
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
