"""`make demo`'s code path on the smoke config: trains, samples, benchmarks, writes the report."""

import json

import pytest

from experiments import demo


@pytest.mark.slow
def test_demo_smoke_writes_report(tmp_path, capsys):
    report = demo.run(str(tmp_path), smoke=True, prompt="import os\n", max_new_tokens=16)
    out = capsys.readouterr().out
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["sample"] == report["sample"] and saved["sample"].startswith("import os\n")
    phases = [(r["phase"], r["batch"]) for r in saved["benchmarks"]]
    assert phases == [("prefill", 1), ("decode", 1), ("prefill", 8), ("decode", 8)]
    for r in saved["benchmarks"]:
        assert r["tokens_per_s"] > 0 and r["roofline_fraction"] > 0
        assert r["param_bytes"] == 4 * saved["parameters"]  # float32 weights
    assert saved["train"]["step"] == 20 and saved["train"]["loss"] < 5.6  # below ln(264)
    assert "decode" in out and "roofline" in out
