"""The model the quantization quality table is measured on (``experiments.quant_quality``).

A byte-level GQA model on the standard library's source, shaped so that every linear layer's
contraction dimension (256 and 768) is a multiple of 128, the group size of the int4 recipe.

Examples::

    python -m experiments.quant_quality --workdir runs/quant_quality
    python -m experiments.train --config experiments/configs/quant_quality.py --workdir runs/q

The full run trains 300 steps of 16 x 128 bytes (a few minutes on a 2-core CPU); ``smoke``
trains 10 steps on 1 MB of the corpus.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig


def get_config(arg: str = "") -> TrainConfig:
    """The quality-table model; ``arg="smoke"`` for the quick variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown quant_quality arg {arg!r}; valid: '', 'smoke'")
    smoke = arg == "smoke"
    return TrainConfig(
        model="dense-small",
        model_overrides=dict(d_model=256, num_heads=8, num_kv_heads=2, ffn_dim=768),
        data=DataConfig(
            kind="stdlib", seq_len=128, batch_size=16, max_bytes=1_000_000 if smoke else None
        ),
        steps=10 if smoke else 300,
        lr=3e-3,
        warmup_steps=2 if smoke else 20,
        eval_every=10 if smoke else 100,
        eval_batches=2 if smoke else 8,
        checkpoint_every=10 if smoke else 100,
        log_every=5 if smoke else 50,
        smoke=smoke,
    )
