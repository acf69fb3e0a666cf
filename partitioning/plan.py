"""Command line for the planner: candidate layouts of a model on a slice, best first.

    python -m partitioning.plan --model palm-540b --hardware tpu-v4 --topology 4x4x4 \
        --phase decode --batch 64 --context 2048
    python -m partitioning.plan --model llama-2-13b --hardware tpu-v5e --topology 2x4 \
        --phase decode --batch 8 --context 8192 --json

``--json`` prints ``{"plans": [...]}`` with the fields of ``Plan.to_json`` (API.md). The same as
a Python call: ``partitioning.plan(...)`` (``partitioning.planner.plan``).
"""

from __future__ import annotations

import argparse
import json
import sys
import types

from partitioning import planner
from partitioning.cost import KV_BYTES, PHASES, WEIGHT_BYTES
from partitioning.layouts import ATTENTION_LAYOUTS, EXPERT_LAYOUTS, FFN_LAYOUTS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m partitioning.plan", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="a models preset, e.g. llama-2-13b")
    p.add_argument("--hardware", required=True, help="tpu-v4, tpu-v5e, ..., h100, cpu")
    p.add_argument("--topology", required=True, help="4x4x4 (TPU torus) or 8 (GPUs)")
    p.add_argument("--phase", required=True, choices=PHASES)
    p.add_argument("--batch", required=True, type=int)
    p.add_argument("--context", required=True, type=int)
    p.add_argument(
        "--weights-dtype", default="bf16", choices=[k for k in WEIGHT_BYTES if k != "f32"]
    )
    p.add_argument("--kv-dtype", default="bf16", choices=[k for k in KV_BYTES if k != "f32"])
    p.add_argument("--kv-memory-fraction", type=float, default=planner.DEFAULT_KV_MEMORY_FRACTION)
    p.add_argument("--objective", default="latency", choices=planner.OBJECTIVES)
    p.add_argument("--ffn", choices=FFN_LAYOUTS, help="keep only this FFN layout")
    p.add_argument("--attention", choices=ATTENTION_LAYOUTS, help="keep only this attention layout")
    p.add_argument("--experts", choices=EXPERT_LAYOUTS, help="MoE: keep only this expert layout")
    p.add_argument("--no-replicas", action="store_true", help="one model over the whole slice")
    p.add_argument("--limit", type=int, default=None, help="print at most this many plans")
    p.add_argument("--json", action="store_true", help='print {"plans": [...]}')
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    skipped: list[str] = []
    try:
        plans = planner.plan(
            args.model,
            args.hardware,
            args.topology,
            phase=args.phase,
            batch=args.batch,
            context=args.context,
            weights_dtype=args.weights_dtype,
            kv_dtype=args.kv_dtype,
            kv_memory_fraction=args.kv_memory_fraction,
            objective=args.objective,
            ffn=args.ffn,
            attention=args.attention,
            experts=args.experts,
            replicas=not args.no_replicas,
            skipped=skipped,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plans = plans[: args.limit] if args.limit else plans
    if args.json:
        print(json.dumps({"plans": [p.to_json() for p in plans]}, indent=1))
        return 0
    print(
        f"{args.model} on {args.hardware}:{args.topology}, {args.phase}, batch {args.batch}, "
        f"context {args.context}, objective {args.objective}"
    )
    print(planner.format_plans(plans))
    for reason in skipped:
        print(f"skipped: {reason}")
    return 0


class _CallableModule(types.ModuleType):
    """``partitioning.plan`` is both this CLI module and the planner function (API.md): once
    this module is imported it shadows the package attribute, so calling it plans."""

    def __call__(self, *args, **kwargs):
        return planner.plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
