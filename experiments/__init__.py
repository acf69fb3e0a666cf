"""Kestrel experiments: a small importable library (data, trainer, checkpoints, metrics) with
thin absl entry points over it (``python -m experiments.train``, ``generate``, ``bench``)."""
