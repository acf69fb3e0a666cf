"""The cost model and planner against published analytical results, closed forms and the models.

Sources:
- Pope et al. 2022, "Efficiently Scaling Transformer Inference" (arXiv:2211.05102).
- Austin et al. 2025, "How To Scale Your Model" (the scaling book), part 7 'All About
  Transformer Inference', section 'Modeling throughput and latency for LLaMA 2-13B'.
"""

import json
import subprocess
import sys

import pytest

import models
import partitioning
from partitioning import cost, hardware, layouts, planner

PALM = models.get_config("palm-540b")


def _plans(model, chip, topology, **kw):
    return partitioning.plan(model, chip, topology, **kw)


@pytest.mark.parametrize(
    "attention, batch, published",
    [
        # Pope et al. Table 1: PaLM 540B, 64 TPU v4 chips, 30% of HBM for the KV cache.
        ("head_sharded", 128, 660),  # "baseline multiquery"
        ("head_sharded", 512, 165),
        ("batch_sharded", 128, 43_000),  # "optimized multiquery"
        ("batch_sharded", 512, 10_700),
    ],
)
def test_pope_table1_max_context(attention, batch, published):
    (best,) = _plans(
        "palm-540b",
        "tpu-v4",
        "4x4x4",
        phase="decode",
        batch=batch,
        context=2048,
        kv_memory_fraction=0.3,
        ffn="2d_weight_stationary",
        attention=attention,
        replicas=False,
    )[:1]
    assert best.max_context == pytest.approx(published, rel=0.03)


def test_pope_regimes_2d_weight_stationary_decode_weight_gathered_prefill():
    """Pope et al. §3.2 / Figure 3 / Table 2: 2D weight-stationary is the low-latency decode
    layout at small batch; weight-gathered wins prefill once the batch holds many tokens."""
    opts = dict(replicas=False, kv_memory_fraction=0.3)
    for batch in (1, 8, 64):
        best = _plans(
            "palm-540b", "tpu-v4", "4x4x4", phase="decode", batch=batch, context=2048, **opts
        )[0]
        assert best.layout.ffn == "2d_weight_stationary", batch
    best = _plans("palm-540b", "tpu-v4", "4x4x4", phase="prefill", batch=512, context=2048, **opts)
    assert best[0].layout.ffn.startswith("weight_gathered")
    # ... and the crossover: a single short prompt prefills fastest weight-stationary.
    best = _plans("palm-540b", "tpu-v4", "4x4x4", phase="prefill", batch=1, context=2048, **opts)
    assert best[0].layout.ffn == "2d_weight_stationary"


@pytest.mark.parametrize(
    "batch, published_ms",
    # Scaling book, LLaMA 2-13B on 8 TPU v5e, 8192-token context, bf16: 'theoretical step
    # time' = (parameters + KV cache) / HBM bandwidth.
    [(1, 4.98), (8, 12.13), (16, 20.30), (32, 36.65), (64, 69.33), (240, 249.09)],
)
def test_scaling_book_llama2_13b_decode_step(batch, published_ms):
    (best,) = _plans(
        "llama-2-13b",
        "tpu-v5e",
        "2x4",
        phase="decode",
        batch=batch,
        context=8192,
        ffn="1d_weight_stationary",
        attention="head_sharded",
        replicas=False,
    )
    assert best.estimate.memory_s * 1e3 == pytest.approx(published_ms, rel=0.03)
    # HBM-bound: the roofline step is the memory time; collectives come on top.
    assert best.estimate.compute_s < best.estimate.memory_s <= best.estimate.step_time_s


def test_layer_weights_match_the_model():
    """The cost model's weight list is the model's, shape and logical axes, for several
    families (GQA + gated, PaLM parallel + MQA, biases + GELU)."""
    for cfg in (
        models.get_config("dense-tiny"),
        models.get_config("palm-8b", num_layers=1, d_model=256, num_heads=2, vocab_size=64),
        models.get_config("dense-tiny", mlp="gelu", mlp_bias=True, qkv_bias=True, out_bias=True),
    ):
        from flax import nnx

        model = models.abstract(cfg)
        got = sorted(
            (tuple(v.shape), tuple(v.get_metadata()["out_sharding"]))
            for _, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)
        )
        want = sorted(
            (s, ax)
            for _, s, ax in cost.layer_weights(cfg) * cfg.num_layers + cost.model_weights(cfg)
        )
        assert got == want
        assert sum(__import__("math").prod(s) for s, _ in want) == models.count_params(cfg)


def test_closed_form_collective_bytes_2d_weight_stationary():
    """Pope et al. §3.2.2: per FFN, 2D weight-stationary moves 2BLE/X over ``model`` (gather
    in, reduce-scatter out) and the hidden's partial sums over ``x``."""
    cfg = models.get_config("palm-540b")
    chip = hardware.get("tpu-v4")
    (layout,) = [
        lay
        for lay in layouts.enumerate_layouts(chip, (4, 4, 4), replicas=False)
        if lay.ffn == "2d_weight_stationary"
        and lay.size("x") == 4
        and lay.attention == "head_sharded"
    ]
    B, E, F, X, M = 16, cfg.d_model, cfg.ffn_dim, 4, 16
    est = cost.estimate(cfg, layout, phase="decode", batch=B, context=128)
    comms = est.layers[0].comms
    gathers = [c for c in comms if c.kind == "all-gather" and c.axes == ("model",)]
    scatters = [c for c in comms if c.kind == "reduce-scatter" and c.axes == ("model",)]
    assert len(gathers) == len(scatters) == 1  # parallel block: one each per layer
    assert gathers[0].result_bytes == B * E / X * 2
    assert scatters[0].operand_bytes == B * E / X * 2
    hidden = [c for c in comms if c.kind == "all-reduce" and c.axes == ("x",)]
    assert sum(c.operand_bytes for c in hidden) == pytest.approx(
        2 * B * F / M * 2 + B * (cfg.num_heads / M + 2) * cfg.head_dim * 2
    )


def test_objectives_rank_differently():
    kw = dict(phase="decode", batch=8, context=2048)
    latency = _plans("llama-2-7b", "tpu-v5e", "4x4", objective="latency", **kw)
    throughput = _plans("llama-2-7b", "tpu-v5e", "4x4", objective="throughput", **kw)
    cheapest = _plans("llama-2-7b", "tpu-v5e", "4x4", objective="cost", **kw)
    fitting = [p.estimate.step_time_s for p in latency if p.estimate.fits]
    assert fitting == sorted(fitting)
    # Throughput fills the cache: a bigger batch than asked, more tokens per chip-second.
    assert throughput[0].estimate.batch > 8
    assert throughput[0].estimate.tokens_per_s > latency[0].estimate.tokens_per_s
    # Cost serves the batch on each replica: fewer chip-seconds per token than latency's best.
    assert cheapest[0].estimate.chip_seconds_per_token < latency[0].estimate.chip_seconds_per_token


def test_errors_name_the_problem():
    kw = dict(phase="decode", batch=8, context=128)
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v9'.*tpu-v4"):
        _plans("llama-2-7b", "tpu-v9", "4x4", **kw)
    with pytest.raises(ValueError, match="unknown model preset|valid"):
        _plans("llama-9", "tpu-v4", "4x4x4", **kw)
    with pytest.raises(ValueError, match="3 axes"):
        _plans("llama-2-7b", "tpu-v4", "4x4", **kw)  # v4 is a 3D torus
    with pytest.raises(ValueError, match="does not fit in a tpu-v5e pod"):
        _plans("llama-2-7b", "tpu-v5e", "32x16", **kw)
    with pytest.raises(ValueError, match="up to 8 GPUs"):
        _plans("llama-2-7b", "h100", "16", **kw)
    with pytest.raises(ValueError, match="bad topology"):
        _plans("llama-2-7b", "h100", "four", **kw)
    with pytest.raises(layouts.LayoutError, match="num_heads=48 over 64 shards"):
        _plans("palm-540b", "tpu-v4", "4x4x4", ffn="1d_weight_stationary", replicas=False, **kw)
    with pytest.raises(layouts.LayoutError, match="batch=3 over"):
        _plans(
            "llama-2-7b",
            "h100",
            "8",
            batch=3,
            phase="decode",
            context=128,
            attention="batch_sharded",
            ffn="1d_weight_stationary",
            replicas=False,
        )
    with pytest.raises(ValueError, match="unknown objective"):
        _plans("llama-2-7b", "h100", "8", objective="speed", **kw)
    (plan,) = _plans(
        "dense-tiny",
        "cpu",
        "2x2",
        ffn="1d_weight_stationary",
        attention="head_sharded",
        replicas=False,
        **kw,
    )
    with pytest.raises(ValueError, match="plan is for 4 chips but 8 devices"):
        plan.mesh()


def test_cli_json_fields_and_errors():
    cmd = [
        sys.executable,
        "-m",
        "partitioning.plan",
        "--model",
        "llama-2-13b",
        "--hardware",
        "tpu-v5e",
        "--topology",
        "2x4",
        "--phase",
        "decode",
        "--batch",
        "8",
        "--context",
        "4096",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    plans = json.loads(out)["plans"]
    fields = {
        "layout",
        "mesh",
        "step_time_s",
        "compute_s",
        "memory_s",
        "comm_s",
        "mfu",
        "mbu",
        "memory_per_chip_bytes",
        "fits",
        "max_context",
        "max_batch",
    }
    assert fields <= set(plans[0])
    assert set(plans[0]["layout"]) == {"ffn", "attention"}
    assert plans[0]["layout"]["ffn"] in layouts.FFN_LAYOUTS
    times = [p["step_time_s"] for p in plans if p["fits"]]
    assert times == sorted(times)
    bad = subprocess.run(cmd[:8] + ["4x4x4"] + cmd[9:], capture_output=True, text=True)
    assert bad.returncode == 2 and "2d torus" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_is_callable_after_the_cli_module_is_imported():
    import partitioning.plan  # noqa: F401  (rebinds the package attribute to the module)

    plans = partitioning.plan("dense-tiny", "cpu", "8", phase="decode", batch=8, context=64)
    assert plans and isinstance(plans[0], planner.Plan)
