"""Run configs: Python files whose ``get_config(arg: str = "") -> TrainConfig`` describes one
training run; every one accepts ``"smoke"`` (a CPU run of well under a minute).

    python -m experiments.train --config experiments/configs/dense_tiny.py:smoke --workdir runs/t
"""
