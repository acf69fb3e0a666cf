"""experiments.early_exit_curve --smoke: the curve's average depth is monotone in the
threshold and spans first exit .. full depth, and threshold 1.0 is the plain model."""

import json

import jax
import numpy as np
import pytest

from experiments import checkpoint, early_exit_curve
from experiments.configs import early_exit as curve_config
from experiments.data import make_dataset


def _plain_perplexity(model, batches) -> float:
    """Full-depth perplexity with numpy's log-softmax over the final logits."""
    forward = jax.jit(lambda m, tokens_BT: m(tokens_BT).logits)
    nll, count = 0.0, 0.0
    for b in batches:
        logits = np.asarray(forward(model, b["inputs"]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, np.asarray(b["targets"])[..., None], -1)[..., 0]
        mask = np.asarray(b["mask"], np.float64)
        nll, count = nll - (picked * mask).sum(), count + mask.sum()
    return float(np.exp(nll / count))


@pytest.mark.slow  # trains, then about ten compiles (curve, generate, speculative, bench)
def test_smoke_curve(tmp_path):
    report = early_exit_curve.run(str(tmp_path), smoke=True)
    rows = report["rows"]
    cfg = curve_config.get_config("smoke")
    model, mcfg = checkpoint.load_model(str(tmp_path))
    assert [r["threshold"] for r in rows] == list(early_exit_curve.THRESHOLDS)
    depths = [r["avg_depth"] for r in rows]  # thresholds fall from 1.0 to 0.0
    assert all(a >= b for a, b in zip(depths, depths[1:], strict=False))
    assert depths[0] == mcfg.num_layers and depths[-1] == mcfg.exit_layers[0]
    batches = make_dataset(cfg.data).eval_batches(cfg.eval_batches)
    np.testing.assert_allclose(rows[0]["perplexity"], _plain_perplexity(model, batches), rtol=1e-5)
    assert rows[0]["vs_full"] == 0.0 and rows[0]["generate_avg_layers"] == mcfg.num_layers
    for s in report["speculative"]:
        assert s["same_tokens"] and 0 <= s["accepted_per_verify"] <= s["draft_tokens"]
    bench = report["bench_step"]
    assert bench["with_exits_s"] > 0 and bench["without_exits_s"] > 0
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert early_exit_curve.format_table(rows).count("\n") == len(rows) + 1
