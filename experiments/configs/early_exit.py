"""The early-exit model of the quality-vs-depth curve (``experiments.early_exit_curve``).

``dense-small`` (byte-level GQA, tied embeddings) at 6 layers with exits after blocks 2 and 4:
per-exit norms and the shared output head, trained with the EE-LLM weighted multi-exit loss
(Chen et al., arXiv:2312.04916, §3) on the standard library's source. Equal weights (1, 1, 1)
gave a better curve and a better final layer than (0.5, 0.5, 1) (2026-11-27: 28.9% vs 26.7%
fewer layers at threshold 0.5, +4.95% vs +4.39% perplexity; final perplexity 5.50 vs 5.86).

Examples::

    python -m experiments.early_exit_curve --workdir runs/early_exit
    python -m experiments.train --config experiments/configs/early_exit.py --workdir runs/ee

The full run trains 400 steps of 16 x 128 bytes (3-15 minutes on a shared 2-core CPU); ``smoke``
trains the same stack at width 64 for 10 steps of 8 x 64 bytes on 1 MB of the corpus.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig


def get_config(arg: str = "") -> TrainConfig:
    """The early-exit curve model; ``arg="smoke"`` for the quick variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown early_exit arg {arg!r}; valid: '', 'smoke'")
    smoke = arg == "smoke"
    overrides = dict(
        num_layers=6, exit_layers=(2, 4), exit_loss_weights=(1.0, 1.0, 1.0), max_seq_len=512
    )
    if smoke:  # the same stack at dense-tiny's width
        overrides.update(d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=192)
    return TrainConfig(
        model="dense-small",
        model_overrides=overrides,
        data=DataConfig(
            kind="stdlib",
            seq_len=64 if smoke else 128,
            batch_size=8 if smoke else 16,
            max_bytes=1_000_000 if smoke else None,
        ),
        steps=10 if smoke else 400,
        lr=3e-3,
        warmup_steps=2 if smoke else 20,
        eval_every=10 if smoke else 100,
        eval_batches=2 if smoke else 8,
        checkpoint_every=10 if smoke else 100,
        log_every=5 if smoke else 50,
        smoke=smoke,
    )
