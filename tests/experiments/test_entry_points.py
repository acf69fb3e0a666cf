"""Entry points import together: flags are declared at launch, not at import."""

import importlib

from absl import flags

ENTRY_POINTS = [
    "experiments.train",
    "experiments.demo",
    "experiments.bench",
    "experiments.generate",
    "experiments.sharded_forward",
]


def test_entry_points_import_together_without_declaring_flags():
    modules = [importlib.import_module(name) for name in ENTRY_POINTS]
    assert all(callable(m.main) and callable(m.define_flags) for m in modules)
    assert "workdir" not in flags.FLAGS  # declared by train and demo, but only at launch
