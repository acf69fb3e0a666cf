"""Serving cost of a MoE model against a dense model with as many *active* parameters.

DeepSpeed-MoE (arXiv:2201.05596 §5) and Yun et al., "Toward Inference-optimal Mixture-of-Expert
Large Language Models" (arXiv:2404.02852) argue that a MoE serves like a model of its active
size only while a decode step touches few experts; at larger batches it reads (and always
stores) its total parameters. This prints the planner's best plan of each, per batch:

    python -m partitioning.compare --hardware h100 --topology 8
    python -m partitioning.compare --hardware tpu-v5e --topology 2x4 --batches 1,16,128

The MoE is ``mixtral-8x7b`` (built here, Mixtral 8x7B's shapes, when the preset is absent);
the dense model is Llama-shaped with the MoE's attention and an FFN whose width makes its
parameters equal the MoE's active ones (``dense_equivalent``).
"""

from __future__ import annotations

import argparse
import sys

from partitioning import cost, planner


def mixtral_8x7b():
    """Mixtral 8x7B (arXiv:2401.04088 §2): the ``models`` preset."""
    from models.configs import get_config

    return get_config("mixtral-8x7b")


def dense_equivalent(cfg, *, multiple: int = 256):
    """``cfg`` with dense FFNs whose width (a multiple of ``multiple``) brings the parameter
    count closest to ``cfg``'s active parameters."""
    dense = cfg.replace(name=f"dense-{cfg.name}-active", channel_pattern=("mlp",), num_experts=0)
    per_width = len(cost._mlp_weights(dense, 1)) - (2 if cfg.mlp_bias else 0)
    target = _params(cfg, active=True) - _params(dense.replace(ffn_dim=1))
    width = target / (per_width * cfg.d_model * cfg.num_layers)
    return dense.replace(ffn_dim=max(multiple, round(width / multiple) * multiple))


def _params(cfg, *, active: bool = False) -> float:
    k = cfg.experts_per_token / cfg.num_experts if cfg.num_experts else 1.0
    total = sum(
        sum(_prod(s) * (k if active and n.startswith("expert_") else 1) for n, s, _ in weights)
        for weights in (cost.layer_weights(cfg, i) for i in range(cfg.num_layers))
    )
    return total + sum(_prod(s) for _, s, _ in cost.model_weights(cfg))


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def compare(hardware, topology, *, batches=(1, 16, 128), context: int = 4096, models=None):
    """Rows of the best decode plan (latency objective) of each model at each batch.

    Returns:
      dicts with ``model``, ``batch``, ``layout``, ``step_ms``, ``tokens_per_s_per_chip``,
      ``memory_per_chip_gb``, ``fits``, ``active_params``, ``total_params`` and
      ``weight_gb_per_token``.
    """
    moe = mixtral_8x7b()
    models = models or (moe, dense_equivalent(moe))
    rows = []
    for cfg in models:
        for batch in batches:
            best = planner.plan(cfg, hardware, topology, phase="decode", batch=batch,
                                context=context)[0]  # fmt: skip
            e = best.estimate
            rows.append(
                {
                    "model": cfg.name,
                    "batch": batch,
                    "layout": "/".join(filter(None, best.layout.describe().values())),
                    "mesh": ",".join(f"{a}={n}" for a, n in best.mesh_shape.items() if n > 1),
                    "step_ms": e.step_time_s * 1e3,
                    "tokens_per_s_per_chip": e.tokens_per_s / best.layout.num_chips,
                    "memory_per_chip_gb": e.memory_per_chip_bytes / 1e9,
                    "fits": e.fits,
                    "active_params": e.active_params,
                    "total_params": e.total_params,
                    "weight_gb_per_token": e.weight_bytes_per_token / 1e9,
                }
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m partitioning.compare", description=__doc__)
    p.add_argument("--hardware", default="h100")
    p.add_argument("--topology", default="8")
    p.add_argument("--batches", default="1,16,128")
    p.add_argument("--context", type=int, default=4096)
    args = p.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = compare(args.hardware, args.topology, batches=batches, context=args.context)
    print(f"decode, context {args.context}, {args.hardware}:{args.topology}, bf16")
    head = ("model", "params (active/total)", "batch", "layout", "mesh", "step_ms",
            "tok/s/chip", "GB/chip", "fits", "weight GB/token")  # fmt: skip
    table = [head]
    for r in rows:
        table.append(
            (
                r["model"], f"{r['active_params'] / 1e9:.2f}B/{r['total_params'] / 1e9:.2f}B",
                str(r["batch"]), r["layout"], r["mesh"], f"{r['step_ms']:.2f}",
                f"{r['tokens_per_s_per_chip']:.1f}", f"{r['memory_per_chip_gb']:.1f}",
                "yes" if r["fits"] else "no", f"{r['weight_gb_per_token']:.3f}",
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
