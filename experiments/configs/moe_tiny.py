"""moe-tiny (4 experts, top-2, byte vocabulary) on the Python standard library's source.

The router's load-balancing and z-losses are added to the cross-entropy (``aux_loss`` in
``metrics.jsonl``). ``dispatch`` picks the MoE path: ``dropless`` (default; sorted tokens and
a grouped matmul) or ``capacity`` (GShard buffers, capacity factor 1.25, drops counted)::

    python -m experiments.train --config experiments/configs/moe_tiny.py:smoke \
        --workdir runs/moe_tiny_smoke
    python -m experiments.train --config experiments/configs/moe_tiny.py --workdir runs/moe_tiny
    python -m experiments.train --config experiments/configs/moe_tiny.py:capacity \
        --workdir runs/moe_tiny_capacity

``smoke`` reads 1 MB of the corpus and trains 40 steps of 8 x 64 tokens.
"""

from experiments.data import DataConfig
from experiments.trainer import TrainConfig

ARGS = ("", "smoke", "capacity", "capacity,smoke")


def get_config(arg: str = "") -> TrainConfig:
    """The run; ``arg`` is ``""``, ``"smoke"``, ``"capacity"`` or ``"capacity,smoke"``."""
    if arg not in ARGS:
        raise ValueError(f"unknown moe_tiny arg {arg!r}; valid: {list(ARGS)}")
    parts = set(arg.split(","))
    overrides = {"moe_dispatch": "capacity"} if "capacity" in parts else {}
    if "smoke" in parts:
        return TrainConfig(
            model="moe-tiny",
            model_overrides=overrides,
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
        model="moe-tiny",
        model_overrides=overrides,
        data=DataConfig(kind="stdlib", seq_len=256, batch_size=32),
        steps=5000,
        lr=3e-3,
        warmup_steps=200,
        eval_every=500,
        eval_batches=8,
        checkpoint_every=1000,
        log_every=50,
    )
