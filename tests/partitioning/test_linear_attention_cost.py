"""The cost model for linear-attention stacks (Based, GLA, RetNet): weights equal to the
model's, a decode state constant in the context with closed-form bytes and scan FLOPs."""

import pytest
from flax import nnx

import models
from models.state import state_bytes
from partitioning import cost, hardware
from partitioning.layouts import Layout

ONE_CHIP = Layout("1d_weight_stationary", "head_sharded", ((), (), (), ()), hardware.get("h100"))


@pytest.mark.parametrize("name", ["based-tiny", "gla-tiny", "retnet-tiny"])
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


def test_state_bytes_closed_form_equal_the_model_and_constant_in_context():
    gla, based = models.get_config("gla-tiny"), models.get_config("based-tiny")
    # float32 [4 heads, 8 keys, 16 values]; Based: [4, 1 + 8 + 64 features, 16 + 1].
    assert cost.recurrent_state_bytes(gla, 0) == 4 * 8 * 16 * 4 == 2048
    assert cost.recurrent_state_bytes(based, 0) == 4 * 73 * 17 * 4 == 19_856
    layer_state = models.build(gla).init_state(1, 8).layers[0]
    assert state_bytes(layer_state) == 2048
    ests = [cost.estimate(gla, ONE_CHIP, phase="decode", batch=8, context=n) for n in (1024, 32768)]
    for est in ests:
        assert est.kv_bytes_per_chip == est.state_bytes_per_chip == 8 * 2 * 2048
        assert est.kv_bytes_per_token_per_chip == 0
        assert cost.max_context(est, 0.5) is None  # unbounded
    assert ests[0].step_time_s == ests[1].step_time_s
    assert ests[0].total_params == models.count_params(gla)
    # Based alternates with local attention, whose ring buffer does not grow per token.
    est = cost.estimate(based, ONE_CHIP, phase="decode", batch=8, context=1024)
    assert est.state_bytes_per_chip == 8 * 2 * 19_856
    assert est.kv_bytes_per_token_per_chip == 0 and est.window_bytes_per_chip > 0


def test_decode_flops_closed_form():
    cfg, B = models.get_config("retnet-tiny"), 4
    est = cost.estimate(cfg, ONE_CHIP, phase="decode", batch=B, context=4096)
    D, V, L, N, Kh, Vh = 64, 264, 2, 4, 16, 32
    # q, k, v, g, o, the [N, V] GroupNorm scale (counted as a matrix), the GELU MLP (2 x 64 x 128).
    matmul = 2 * D * N * Kh + 3 * D * N * Vh + N * Vh + 2 * D * 128
    scan = N * 5 * Kh * Vh  # decay S + k^T v, q S per token
    assert est.flops_per_chip == pytest.approx(L * B * (2 * matmul + scan) + 2 * B * D * V)
