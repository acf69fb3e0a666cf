"""The `make demo` run: dense-small (1.6M parameters) on the standard library's source.

Examples::

    python -m experiments.demo --workdir runs/demo           # what `make demo` runs
    python -m experiments.train --config experiments/configs/demo.py --workdir runs/demo
    python -m experiments.train --config experiments/configs/demo.py:smoke --workdir runs/s

The full run trains 240 steps of 16 x 128 bytes (about 2 minutes on a 2-core CPU); ``smoke``
trains 20 steps on 1 MB of the corpus.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig


def get_config(arg: str = "") -> TrainConfig:
    """The demo run; ``arg="smoke"`` for the quick variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown demo arg {arg!r}; valid: '', 'smoke'")
    smoke = arg == "smoke"
    return TrainConfig(
        model="dense-small",
        data=DataConfig(
            kind="stdlib", seq_len=128, batch_size=16, max_bytes=1_000_000 if smoke else None
        ),
        steps=20 if smoke else 240,
        lr=3e-3,
        warmup_steps=5 if smoke else 20,
        eval_every=10 if smoke else 80,
        eval_batches=2 if smoke else 4,
        checkpoint_every=20 if smoke else 80,
        log_every=5 if smoke else 20,
        smoke=smoke,
    )
