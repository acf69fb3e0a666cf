"""``python -m kernels.gpucheck`` on a machine without a GPU: every case is recorded with the
reason it could not run, nothing stops the run, and the JSON lines land in ``--out``."""

import json

from kernels import gpucheck


def test_records_every_selected_case_with_its_reason(tmp_path):
    assert gpucheck.main(["--out", str(tmp_path), "--only", "correct", "--select", "ws"]) == 0
    records = [json.loads(line) for line in (tmp_path / "gpucheck.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps[0] == "env" and steps[-1] == "correct" and "done_s" in records[-1]
    cases = [r for r in records if r["step"] == "correct" and "done_s" not in r]
    assert len(cases) == sum("ws" in repr(c) for c in gpucheck.PREFILL_CASES) == 4
    # The warp-specialized cases call the kernel directly: Pallas itself names the backend.
    assert all(c["ws"] and "CPU backend" in c["error"] for c in cases)


def test_quant_cases_are_recorded_with_their_reason(tmp_path):
    assert gpucheck.main(["--out", str(tmp_path), "--only", "quant_correct"]) == 0
    records = [json.loads(line) for line in (tmp_path / "gpucheck.jsonl").read_text().splitlines()]
    cases = [r for r in records if r["step"] == "quant_correct" and "done_s" not in r]
    assert len(cases) == len(gpucheck.QUANT_CASES)
    assert {c["activations"] for c in cases} == {None, "int8", "fp8"}
    assert all("needs a GPU backend" in c["error"] for c in cases)
