"""kernels.bench: the CLI's JSON lines on CPU, the closed-form work counts, the cuDNN ratio."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from kernels import bench

_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
_COMMON = {"op", "phase", "pass", "shape", "impl", "device", "backend", "jax"}
_GPU_ONLY = {"jax_cudnn", "kestrel_cudnn", "jax_pallas_triton_mha", "jax_pallas_mgpu"}


def _run(*args):
    cmd = [sys.executable, "-m", "kernels.bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_ENV, timeout=120)


@pytest.fixture(scope="module")
def records():
    result = _run("attention", "--small", "--backward", "--repeats", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_line_is_a_record_with_the_documented_fields(records):
    assert records
    for r in records:
        assert r.keys() >= _COMMON, r
        assert r["op"] == "attention" and r["device"] == "cpu"
        assert set(r["shape"]) == {"B", "T", "S", "N", "K", "H", "causal", "dtype"}
        assert r["shape"]["dtype"] == "bfloat16"
        assert ("skipped" in r) != ("seconds" in r), r
    keys = {(r["phase"], r["pass"]) for r in records}
    assert keys == {("prefill", "fwd"), ("prefill", "bwd"), ("decode", "fwd")}


def test_jnp_impls_are_measured_with_closed_form_work_and_small_errors(records):
    measured = {(r["phase"], r["pass"], r["impl"]): r for r in records if "seconds" in r}
    for phase, pass_ in (("prefill", "fwd"), ("prefill", "bwd"), ("decode", "fwd")):
        for impl in ("kestrel_reference", "kestrel_xla", "jax_xla"):
            r = measured[phase, pass_, impl]
            s = r["shape"]
            assert r["seconds"] > 0
            if phase == "prefill":
                # Causal: half of 4*B*T*S*N*H; the backward pass counts 2.5x the forward.
                fwd = 4 * s["B"] * s["T"] * s["S"] * s["N"] * s["H"] / 2
                assert r["flops"] == fwd * (2.5 if pass_ == "bwd" else 1)
                assert r["tflop_per_s"] == pytest.approx(r["flops"] / r["seconds"] / 1e12)
            else:
                kv = 2 * s["B"] * s["S"] * s["K"] * s["H"]
                assert r["bytes"] == (kv + 2 * s["B"] * s["N"] * s["H"]) * 2  # bfloat16
                assert r["tb_per_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e12)
            if pass_ == "fwd":
                assert r["max_abs_err"] <= 2e-2
            assert "vs_cudnn" not in r  # cuDNN is not measured on CPU


def test_unavailable_baselines_are_skipped_lines_with_reasons(records):
    skipped = {(r["phase"], r["impl"]): r["skipped"] for r in records if "skipped" in r}
    for impl in _GPU_ONLY:
        assert "gpu" in skipped["prefill", impl].lower(), skipped["prefill", impl]
    assert "gpu backend" in skipped["decode", "jax_pallas_decode_gqa"]
    assert "tpu backend" in skipped["prefill", "jax_pallas_tpu_flash"]
    assert "needs a GPU backend" in skipped["prefill", "kestrel_pallas_gpu"]
    assert "needs a TPU backend" in skipped["prefill", "kestrel_pallas_tpu"]


def test_unknown_op_exits_nonzero_listing_valid_ops():
    result = _run("quantize")
    assert result.returncode != 0
    assert "unknown op 'quantize'" in result.stderr and "attention" in result.stderr


def test_unknown_impl_is_an_error_listing_valid(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["attention", "--small", "--impls", "kestrel_xla,triton"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "unknown impls ['triton']" in err and "kestrel_xla" in err


def test_vs_cudnn_is_the_time_ratio_to_the_cudnn_record(monkeypatch):
    # Stand in XLA for cuDNN so the ratio logic runs on CPU.
    monkeypatch.setitem(bench.PREFILL_IMPLS, "jax_cudnn", bench._jax_nn_prefill("xla"))
    records = []
    bench.bench_attention_shape(
        bench.SMALL_SHAPES["prefill"],
        dtype=jnp.float32,
        passes=["fwd"],
        impls={"jax_cudnn", "kestrel_xla"},
        repeats=2,
        warmup=1,
        emit=records.append,
    )
    cudnn, xla = records
    assert (cudnn["impl"], xla["impl"]) == ("jax_cudnn", "kestrel_xla")
    assert cudnn["vs_cudnn"] == 1.0
    assert xla["vs_cudnn"] == pytest.approx(cudnn["seconds"] / xla["seconds"])
    assert xla["max_abs_err"] < 1e-4


def test_quant_records_on_cpu():
    """`kernels.bench quant --small`: every case measures the bf16 baseline and the XLA
    dequantize-then-matmul path, and says why the Pallas and GPU-only baselines are skipped."""
    result = _run("quant", "--small", "--repeats", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    cases = {(r["scheme"], r["group_size"], r["activations"]) for r in records}
    assert cases == {("int8", None, None), ("int4", 128, None), ("int8", None, "int8")}
    for r in records:
        assert r["op"] == "quant" and ("skipped" in r) != ("seconds" in r), r
        if r["impl"] == "kestrel_xla":
            assert r["rel_err_vs_reference"] < 1e-2 and r["vs_bf16"] > 0
            unit = "tb_per_s" if r["phase"] == "decode" else "tflop_per_s"
            assert r[unit] > 0
        if r["impl"] == "jax_bf16" and r["phase"] == "decode":
            assert r["weight_bytes"] == r["K"] * r["N"] * 2  # bf16 weights, read once
        if r["impl"] in ("kestrel_pallas_gpu", "jax_pallas_mixed_mgpu"):
            assert "gpu" in r["skipped"].lower()
    bad = _run("quant", "--impls", "kestrel_cuda")
    assert bad.returncode == 2 and "unknown impls ['kestrel_cuda']" in bad.stderr


def test_grouped_matmul_records_on_cpu():
    """`kernels.bench grouped_matmul --small --backward`: ragged_dot, Kestrel's XLA path and the
    dense padded einsum are measured with 2MKN (x3 for gradients) FLOPs; the Pallas and megablox
    paths are skipped, naming the backend they need."""
    result = _run("grouped_matmul", "--small", "--backward", "--repeats", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["impl"], r["pass"]) for r in records} == {
        (impl, pass_) for impl in bench.GMM_IMPLS for pass_ in ("fwd", "bwd")
    }
    for r in records:
        assert r["op"] == "grouped_matmul" and ("skipped" in r) != ("seconds" in r), r
        if r["impl"] in ("jax_ragged_dot", "kestrel_xla", "dense_padded"):
            flops = 2 * r["M"] * r["K"] * r["N"] * (3 if r["pass"] == "bwd" else 1)
            assert r["flops"] == flops and r["vs_ragged_dot"] > 0
            if r["pass"] == "fwd":
                assert r["rel_err_vs_reference"] < 1e-2
        else:
            backend = "gpu" if r["impl"] == "kestrel_pallas_gpu" else "tpu"
            assert f"{backend} backend" in r["skipped"].lower(), r
    assert sum(bench.SMALL_GMM_CASES[0].group_sizes()) == bench.SMALL_GMM_CASES[0].M


def test_scan_records_on_cpu():
    """`kernels.bench scan --small --backward`: the lax.scan oracle and the chunked XLA path are
    measured (tokens/s = B*T/seconds) with small errors against the float32 oracle; the Pallas
    paths are skipped lines naming the backend they need."""
    result = _run("scan", "--small", "--backward", "--repeats", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["impl"], r["pass"]) for r in records] == [
        (impl, pass_) for pass_ in ("fwd", "bwd") for impl in bench.SCAN_IMPLS
    ]
    case = bench.SMALL_SCAN_CASES[0]
    for r in records:
        assert r["op"] == "scan" and r["device"] == "cpu" and r["dtype"] == "bfloat16", r
        assert {k: r[k] for k in ("B", "T", "H", "G", "K", "V", "chunk")} == {
            k: getattr(case, k) for k in ("B", "T", "H", "G", "K", "V", "chunk")
        }
        assert ("skipped" in r) != ("seconds" in r), r
        if r["impl"] in ("kestrel_reference", "kestrel_xla"):
            assert r["tokens_per_s"] == pytest.approx(r["B"] * r["T"] / r["seconds"])
            assert r["vs_reference"] > 0
            if r["pass"] == "fwd":  # bfloat16 outputs against the float32 oracle
                assert r["rel_err_vs_reference"] < 2e-2 and r["max_abs_err"] < 0.1, r
                assert r["state_rel_err_vs_reference"] < 1e-4, r
            else:
                assert "rel_err_vs_reference" not in r
        else:
            backend = "GPU" if r["impl"] == "kestrel_pallas_gpu" else "TPU"
            assert f"needs a {backend} backend" in r["skipped"], r
