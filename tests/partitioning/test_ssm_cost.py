"""The cost model for Mamba-2 and hybrid stacks: weights equal to the model's, decode state
constant in the context, closed-form FLOPs and bytes on one chip, unbounded ``max_context``."""

import math

import pytest
from flax import nnx

import models
import partitioning
from partitioning import cost, hardware
from partitioning.layouts import Layout

MAMBA = models.get_config("mamba2-2.7b")
HYBRID = models.get_config("mamba2-hybrid-tiny")
H100 = hardware.get("h100")
ONE_CHIP = Layout("1d_weight_stationary", "head_sharded", ((), (), (), ()), H100)
# Per layer and sequence: 3 conv inputs of C = 5120 + 2 * 128 channels in bf16, and the
# float32 [80 heads, 128 state, 64 head_dim] state.
STATE_2_7B = 3 * 5376 * 2 + 80 * 128 * 64 * 4


@pytest.mark.parametrize("name", ["mamba2-tiny", "mamba2-hybrid-tiny"])
def test_layer_weights_match_the_model(name):
    cfg = models.get_config(name)
    got = sorted(
        (tuple(v.shape), tuple(v.get_metadata()["out_sharding"]))
        for _, v in nnx.iter_graph(models.abstract(cfg))
        if isinstance(v, nnx.Param)
    )
    want = [w for i in range(cfg.num_layers) for w in cost.layer_weights(cfg, i)]
    want = sorted((s, ax) for _, s, ax in want + cost.model_weights(cfg))
    assert got == want


def test_state_bytes_closed_form_and_constant_in_context():
    assert cost.ssm_state_bytes(MAMBA) == STATE_2_7B == 2_653_696
    ests = [
        cost.estimate(MAMBA, ONE_CHIP, phase="decode", batch=8, context=n) for n in (1024, 32768)
    ]
    for est in ests:
        assert est.kv_bytes_per_chip == est.state_bytes_per_chip == 8 * 64 * STATE_2_7B
        assert est.kv_bytes_per_token_per_chip == 0
        assert cost.max_context(est, 0.5) is None  # unbounded
    assert ests[0].step_time_s == ests[1].step_time_s  # nothing depends on the context
    assert ests[0].total_params == models.count_params(MAMBA)


def test_decode_flops_and_bytes_closed_form():
    B = 4
    est = cost.estimate(MAMBA, ONE_CHIP, phase="decode", batch=B, context=4096)
    D, V, L = MAMBA.d_model, MAMBA.vocab_size, MAMBA.num_layers
    inner, H, N, P = 5120, 80, 128, 64
    C = inner + 2 * N
    matmul = D * (inner + C + H) + 4 * C + inner * D  # in_proj, depthwise conv, out_proj
    scan = H * 5 * N * P  # exp(a) S + k^T v, q S per token
    assert est.flops_per_chip == pytest.approx(L * B * (2 * matmul + scan) + 2 * B * D * V)
    # bf16 weights once, the state read and written, the output head.
    assert est.hbm_bytes_per_chip == pytest.approx(
        L * (2 * matmul + 2 * B * STATE_2_7B) + 2 * D * V
    )


def test_prefill_scan_flops_use_the_chunk():
    T, Q, N, P, H = 1000, 256, 128, 64, 80
    assert cost.ssm_scan_flops(MAMBA, 2, T, "prefill") == 2 * T * H * (Q * (N + P) + 4 * N * P)
    assert cost.ssm_scan_flops(MAMBA, 2, 1, "decode") == 2 * H * 5 * N * P


def test_hybrid_counts_attention_cache_and_state():
    est = cost.estimate(HYBRID, ONE_CHIP, phase="decode", batch=2, context=512)
    K, Hd, L_attn = HYBRID.num_kv_heads, HYBRID.head_dim, 1  # layers 0, 1 Mamba-2; 2 attention
    per_token = 2 * K * Hd * 2 * 2 * L_attn  # batch 2, k and v, bf16
    assert est.kv_bytes_per_token_per_chip == per_token
    state = 2 * 2 * cost.ssm_state_bytes(HYBRID)
    assert est.state_bytes_per_chip == state
    assert est.kv_bytes_per_chip == per_token * 512 + state
    budget = 0.5 * H100.hbm_bytes
    assert cost.max_context(est, 0.5) == int((budget - state) // per_token)
    per_seq = per_token / 2 * 512 + state / 2
    assert cost.max_batch(est, 0.5) == int(budget // per_seq)


def test_planner_reports_unbounded_context():
    plans = partitioning.plan("mamba2-2.7b", "h100", "8", phase="decode", batch=8, context=8192)
    assert plans and all(p.max_context is None for p in plans)
    assert plans[0].estimate.fits
    assert "unbounded" in partitioning.planner.format_plans(plans[:1])
    assert math.isfinite(plans[0].estimate.step_time_s)
