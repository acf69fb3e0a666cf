"""experiments.benchmark: analytical costs against closed forms, and the bench CLI's JSON."""

import json
import math
import subprocess
import sys

import pytest

import models
import partitioning.layouts
from experiments import benchmark


def test_kv_bytes_per_token_llama_2_7b():
    # 2 (K and V) x 32 layers x 32 heads x 128 dims x 2 bytes = 0.5 MiB per token in bf16.
    cfg = models.get_config("llama-2-7b", dtype="bfloat16")
    assert benchmark.kv_bytes_per_token(cfg) == 524_288
    mqa = models.get_config("palm-8b", dtype="bfloat16")
    assert benchmark.kv_bytes_per_token(mqa) == 2 * 32 * 1 * 256 * 2
    # An int8 cache: one byte per value plus a float32 scale per token and kv head.
    int8 = models.get_config("llama-2-7b", dtype="bfloat16", kv_cache_dtype="int8")
    assert benchmark.kv_bytes_per_token(int8) == 2 * 32 * 32 * (128 + 4)


def test_decode_costs_closed_form():
    cfg = models.get_config("dense-tiny")
    n_params = models.count_params(cfg)
    matmul = n_params - cfg.vocab_size * cfg.d_model  # untied: the input embedding is a gather
    costs = benchmark.decode_costs(cfg, batch=4, context=100, weight_bytes=4 * n_params)
    attn = 4 * 4 * 100 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    assert costs.flops == 2 * 4 * matmul + attn
    kv = 4 * 100 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert costs.bytes == pytest.approx(4 * matmul + kv)


@pytest.mark.slow
def test_bench_cli_prints_json_lines():
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench",
        "--model",
        "dense-tiny",
        "--batch",
        "1,2",
        "--prompt_len",
        "8",
        "--new_tokens",
        "4",
        "--repeats",
        "1",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["phase"], r["batch"]) for r in records] == [
        ("prefill", 1),
        ("decode", 1),
        ("prefill", 2),
        ("decode", 2),
    ]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["roofline_fraction"] > 0
        assert r["param_bytes"] == 4 * models.count_params(models.get_config("dense-tiny"))
        assert r["kv_bytes"] == r["batch"] * 12 * benchmark.kv_bytes_per_token(
            models.get_config("dense-tiny")
        )


def test_bench_cli_rejects_unknown_preset():
    cmd = [sys.executable, "-m", "experiments.bench", "--model", "gpt-5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "unknown model preset 'gpt-5'; valid:" in res.stderr
    assert "Traceback" not in res.stderr


def test_bench_planned_reports_prediction_beside_measurement():
    import jax

    model = models.build(models.get_config("dense-tiny"), seed=0)
    records = benchmark.bench_planned(model, batch=8, prompt_len=16, new_tokens=4, repeats=1)
    assert [r["phase"] for r in records] == ["prefill", "decode"]
    for r in records:
        assert r["plan"]["ffn"] in partitioning.layouts.FFN_LAYOUTS
        assert math.prod(r["plan"]["mesh"].values()) == jax.device_count()
        assert r["predicted_s"] > 0
        assert r["measured_over_predicted"] == pytest.approx(r["measured_s"] / r["predicted_s"])


def test_decode_state_bytes_grow_for_attention_only():
    """A KV cache grows with the context; a recurrent state does not (closed forms)."""
    dense = models.build(models.get_config("dense-tiny"))
    griffin = models.build(models.get_config("griffin-tiny"))
    for L in (64, 512):
        # layers x (keys, values) x [B, S, K, H] float32, plus the int32 lengths [B]
        kv = 2 * 2 * (2 * L * 2 * 16) * 4
        assert benchmark.decode_state_bytes(dense, 2, L) == kv + 2 * 4
    assert benchmark.decode_state_bytes(griffin, 1, 64) == benchmark.decode_state_bytes(
        griffin, 1, 4096
    )
