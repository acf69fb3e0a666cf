"""The cost model for Griffin / RecurrentGemma stacks: ``"rglru"`` layers are recurrent
(weights equal to the model's, a closed-form state constant in the context), ``"local_attention"``
layers hold a ring buffer of ``min(context, window)`` slots, so decode costs stop growing past
the window and ``max_context`` is unbounded."""

import pytest
from flax import nnx

import models
import partitioning
from models.state import state_bytes
from partitioning import cost, hardware
from partitioning.layouts import Layout

TINY = models.get_config("griffin-tiny")
RG2B = models.get_config("recurrentgemma-2b")
ONE_CHIP = Layout("1d_weight_stationary", "head_sharded", ((), (), (), ()), hardware.get("h100"))
# Per rglru layer and sequence: W - 1 = 3 conv inputs of R channels in bf16, float32 h [R].
STATE_TINY = 3 * 64 * 2 + 64 * 4
STATE_2B = 3 * 2560 * 2 + 2560 * 4


def _params(cfg):
    return [
        (path, tuple(v.shape), tuple(v.get_metadata()["out_sharding"]))
        for path, v in nnx.iter_graph(models.abstract(cfg))
        if isinstance(v, nnx.Param)
    ]


def test_layer_weights_match_the_model():
    params = _params(TINY)
    want = [w for i in range(TINY.num_layers) for w in cost.layer_weights(TINY, i)]
    assert sorted((s, ax) for _, s, ax in params) == sorted(
        (s, ax) for _, s, ax in want + cost.model_weights(TINY)
    )
    for i in range(TINY.num_layers):
        layer = [(p, s, ax) for p, s, ax in params if p[:2] == ("blocks", i)]
        weights = cost.layer_weights(TINY, i)
        assert sum(cost.math.prod(s) for _, s, _ in layer) == sum(
            cost.math.prod(s) for _, s, _ in weights
        )
        assert sorted((s, ax) for _, s, ax in layer) == sorted((s, ax) for _, s, ax in weights)
        if TINY.mixer(i) == "rglru":  # the mixer's weights under the model's own names
            names = {
                "_".join(k for k in p[3:] if k != "kernel"): (s, ax)
                for p, s, ax in layer
                if p[2] == "mixer"
            }
            assert names == {n: (s, ax) for n, s, ax in cost._rglru_weights(TINY)}
    est = cost.estimate(TINY, ONE_CHIP, phase="decode", batch=1, context=64)
    assert est.total_params == models.count_params(TINY)


def test_state_bytes_closed_form_equal_the_model():
    assert TINY.mixer(0) == "rglru" and TINY.mixer(2) == "local_attention"
    assert cost.recurrent_state_bytes(TINY, 0) == STATE_TINY == 640
    assert cost.recurrent_state_bytes(RG2B, 0) == STATE_2B == 25_600
    # griffin-tiny computes in float32: its conv inputs and its cache take 4 bytes.
    assert TINY.dtype == "float32"
    state = models.build(TINY).init_state(1, 64).layers
    assert state_bytes(state[0]) == cost.recurrent_state_bytes(TINY, 0, 4) == 3 * 64 * 4 + 64 * 4
    # The ring buffer: window (8) slots of 1 kv head x 16 dims, keys and values.
    assert state_bytes(state[2]) == 8 * 1 * 16 * 2 * 4
    f32 = cost.estimate(
        TINY, ONE_CHIP, phase="decode", batch=1, context=64, kv_dtype="f32", activation_dtype="f32"
    )
    assert f32.kv_bytes_per_chip == sum(state_bytes(x) for x in state)
    ring = 8 * 1 * 16 * 2 * 2  # bf16
    for context in (8, 64, 4096):
        est = cost.estimate(TINY, ONE_CHIP, phase="decode", batch=4, context=context)
        assert est.state_bytes_per_chip == 4 * 2 * STATE_TINY
        assert est.window_bytes_per_chip == 4 * ring
        assert est.kv_bytes_per_chip == 4 * (2 * STATE_TINY + ring)
        assert est.kv_bytes_per_token_per_chip == 0
    est = cost.estimate(TINY, ONE_CHIP, phase="decode", batch=4, context=5)
    assert est.kv_bytes_per_chip == 4 * (2 * STATE_TINY + 5 * 16 * 2 * 2)  # min(context, W)


def test_decode_flops_closed_form():
    B, context = 4, 100
    est = cost.estimate(TINY, ONE_CHIP, phase="decode", batch=B, context=context)
    D, R, Nr, W, F, V = 64, 64, 4, 4, 128, 264
    N, K, H, window = 4, 1, 16, 8
    mlp = 3 * D * F  # geglu up, gate, down
    # linear_y/x/out, the depthwise conv, two block-diagonal gates and their [N, R/N] biases.
    lru = 3 * D * R + W * R + 2 * R * R // Nr + 2 * R + mlp
    attn = D * N * H + 2 * D * K * H + N * H * D + mlp
    per_token = 2 * (2 * (lru + 5 * R / 2) + attn) + 4 * window * N * H  # 5 R: recurrence
    assert est.flops_per_chip == pytest.approx(B * per_token + 2 * B * D * V)


def test_recurrentgemma_decode_constant_beyond_the_window():
    ests = {
        n: cost.estimate(RG2B, ONE_CHIP, phase="decode", batch=8, context=n)
        for n in (1024, 2048, 8192, 65536)
    }
    rglru = sum(RG2B.mixer(i) == "rglru" for i in range(RG2B.num_layers))
    local = RG2B.num_layers - rglru
    assert (rglru, local) == (18, 8)
    ring = 8 * 2048 * 1 * 256 * 2 * 2  # batch x window slots x kv head x head_dim x k, v x bf16
    for n in (2048, 8192, 65536):
        est = ests[n]
        assert est.state_bytes_per_chip == 8 * rglru * STATE_2B
        assert est.kv_bytes_per_chip == 8 * rglru * STATE_2B + local * ring
        assert est.hbm_bytes_per_chip == ests[2048].hbm_bytes_per_chip
        assert est.flops_per_chip == ests[2048].flops_per_chip
        assert est.step_time_s == ests[2048].step_time_s
        assert est.unique_bytes == ests[2048].unique_bytes
        assert cost.max_context(est, 0.5) is None
    assert ests[1024].hbm_bytes_per_chip < ests[2048].hbm_bytes_per_chip  # window not yet full


def test_recurrentgemma_plan_mbu_and_unbounded_context():
    plans = partitioning.plan(
        "recurrentgemma-2b", "tpu-v5e", "2x2", phase="decode", batch=8, context=8192
    )
    assert plans
    for p in plans:
        assert p.estimate.mbu <= 1.0
        assert p.max_context is None
        assert p.estimate.kv_bytes_per_token_per_chip == 0


def test_mistral_sliding_window_reads_the_window_but_holds_the_context():
    cfg = models.get_config("mistral-7b")
    assert cfg.window(0) == 4096
    short, long = (
        cost.estimate(cfg, ONE_CHIP, phase="decode", batch=1, context=n) for n in (8192, 32768)
    )
    assert long.kv_bytes_per_chip == 4 * short.kv_bytes_per_chip  # full-length cache
    assert long.kv_bytes_per_token_per_chip == short.kv_bytes_per_token_per_chip > 0
    assert long.hbm_bytes_per_chip == short.hbm_bytes_per_chip  # reads bounded by the window
    assert long.unique_bytes == short.unique_bytes
    assert long.window_bytes_per_chip == 0
