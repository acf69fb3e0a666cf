"""dense-tiny on multi-query associative recall (Zoology, arXiv:2312.04927 §3); reports the
token accuracy at the query positions.

Examples::

    python -m experiments.train --config experiments/configs/mqar_tiny.py:smoke \
        --workdir runs/mqar_tiny_smoke
    python -m experiments.train --config experiments/configs/mqar_tiny.py --workdir runs/mqar_tiny

The model's vocabulary is set to the task's (``data.vocab_size``). ``smoke`` trains 40 steps
of 16 x 64 tokens, 8 key-value pairs: about 10 s on a 2-core CPU after start-up.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig


def get_config(arg: str = "") -> TrainConfig:
    """The run; ``arg="smoke"`` for the quick CPU variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown mqar_tiny arg {arg!r}; valid: '', 'smoke'")
    if arg == "smoke":
        return TrainConfig(
            model="dense-tiny",
            data=DataConfig(kind="mqar", seq_len=64, batch_size=16, vocab_size=64, num_kv_pairs=8),
            steps=40,
            lr=3e-3,
            warmup_steps=5,
            weight_decay=0.0,
            eval_every=20,
            eval_batches=2,
            checkpoint_every=20,
            log_every=5,
            smoke=True,
        )
    return TrainConfig(
        model="dense-tiny",
        data=DataConfig(kind="mqar", seq_len=256, batch_size=64, vocab_size=8192, num_kv_pairs=16),
        steps=20000,
        lr=1e-3,
        warmup_steps=500,
        weight_decay=0.1,
        eval_every=1000,
        eval_batches=8,
        checkpoint_every=2000,
        log_every=100,
    )
