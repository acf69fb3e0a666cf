"""dense-tiny (2 layers, d=64, GQA, byte vocabulary) on the Python standard library's source.

Examples::

    python -m experiments.train --config experiments/configs/dense_tiny.py:smoke \
        --workdir runs/dense_tiny_smoke
    python -m experiments.train --config experiments/configs/dense_tiny.py \
        --workdir runs/dense_tiny
    python -m experiments.generate --checkpoint runs/dense_tiny --prompt "def main():"

``smoke`` reads 1 MB of the corpus and trains 40 steps of 8 x 64 tokens: about 10 s on a
2-core CPU after start-up.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig


def get_config(arg: str = "") -> TrainConfig:
    """The run; ``arg="smoke"`` for the quick CPU variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown dense_tiny arg {arg!r}; valid: '', 'smoke'")
    if arg == "smoke":
        return TrainConfig(
            model="dense-tiny",
            data=DataConfig(kind="stdlib", seq_len=64, batch_size=8, max_bytes=1_000_000),
            steps=40,
            lr=3e-3,
            warmup_steps=5,
            eval_every=20,
            eval_batches=2,
            checkpoint_every=20,
            log_every=5,
            smoke=True,
        )
    return TrainConfig(
        model="dense-tiny",
        data=DataConfig(kind="stdlib", seq_len=256, batch_size=32),
        steps=5000,
        lr=3e-3,
        warmup_steps=200,
        eval_every=500,
        eval_batches=8,
        checkpoint_every=1000,
        log_every=50,
    )
