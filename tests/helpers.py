"""Shared test utilities."""

# Tolerances keyed by dtype (STYLE.md): float32 ~1e-5, bfloat16 ~2e-2.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
