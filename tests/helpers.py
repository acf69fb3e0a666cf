"""Shared test utilities."""

# Tolerances keyed by dtype (STYLE.md): float32 ~1e-5, bfloat16 ~2e-2.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


def sharpened_early_exit_model():
    """``early-exit-tiny`` (seed 0) with its output head scaled by 40: the exits' confidences
    spread over [0, 1], so thresholds split the exits and a draft exit agrees with the final
    layer on some tokens, not all."""
    import models

    m = models.build(models.get_config("early-exit-tiny"), seed=0)
    m.lm_head.kernel[...] *= 40
    return m
