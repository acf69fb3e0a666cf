"""Sparse upcycling (Komatsuzaki et al., arXiv:2212.05055): dense-tiny's MLPs become 4 experts
(top-2), each a copy of the dense MLP, and training continues from the dense checkpoint.

Train the dense model first, then upcycle it (``init_from`` names the dense workdir)::

    python -m experiments.train --config experiments/configs/dense_tiny.py \
        --workdir runs/dense_tiny
    python -m experiments.train --config experiments/configs/upcycle_tiny.py \
        --workdir runs/upcycle_tiny --set init_from=runs/dense_tiny

At step 0 the upcycled model computes the dense model's logits (renormalised top-2 weights sum
to 1 over identical experts), so its loss curve starts where the dense run ended. ``smoke``
upcycles ``runs/dense_tiny_smoke`` (the dense config's smoke run) for 20 steps.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig

# dense-tiny with every MLP an MoE layer of experts the size of the dense MLP (ffn_dim 192)
UPCYCLED = dict(channel_pattern=("moe",), num_experts=4, experts_per_token=2, moe_ffn_dim=192)


def get_config(arg: str = "") -> TrainConfig:
    """The run; ``arg="smoke"`` for the quick CPU variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown upcycle_tiny arg {arg!r}; valid: '', 'smoke'")
    if arg == "smoke":
        return TrainConfig(
            model="dense-tiny",
            model_overrides=UPCYCLED,
            init_from="runs/dense_tiny_smoke",
            data=DataConfig(kind="stdlib", seq_len=64, batch_size=8, max_bytes=1_000_000),
            steps=20,
            lr=1e-3,
            warmup_steps=2,
            eval_every=10,
            eval_batches=2,
            checkpoint_every=20,
            log_every=5,
            smoke=True,
        )
    return TrainConfig(
        model="dense-tiny",
        model_overrides=UPCYCLED,
        init_from="runs/dense_tiny",
        data=DataConfig(kind="stdlib", seq_len=256, batch_size=32),
        steps=2000,
        lr=1e-3,
        warmup_steps=100,
        eval_every=250,
        eval_batches=8,
        checkpoint_every=500,
        log_every=50,
    )
