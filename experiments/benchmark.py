"""Prefill and decode latency/throughput of a model, with the roofline of the device it ran on.

The roofline is the analytical lower bound on a step's time, ``max(FLOPs / peak FLOP/s,
HBM bytes / bandwidth)`` (Pope et al. 2022, §2; "How To Scale Your Model", ch. 1): decode at
small batch is bound by reading the weights and the KV cache once per step, prefill by matmul
FLOPs. On accelerators the peaks come from ``partitioning.hardware``; on the CPU they are
measured on the host (``hardware.measure_cpu``), since no datasheet describes it.

Used by ``python -m experiments.bench``, ``make demo`` and the quickstart notebook.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.configs import ModelConfig
from models.state import state_bytes
from partitioning import hardware


@dataclasses.dataclass(frozen=True)
class Costs:
    """FLOPs and HBM bytes of one forward step."""

    flops: float
    bytes: float


def param_bytes(model) -> int:
    """Bytes of every parameter as stored."""
    return state_bytes(nnx.state(model, nnx.Param))


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """KV-cache bytes one token adds across all attention layers: ``2 * L * K * H * itemsize``,
    or ``2 * L * K * (H + 4)`` for an int8 cache (a float32 scale per token and kv head)."""
    layers = sum(cfg.mixer(i) == "attention" for i in range(cfg.num_layers))
    if cfg.kv_cache_dtype == "int8":
        return 2 * layers * cfg.num_kv_heads * (cfg.head_dim + 4)
    return 2 * layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def _matmul_params(cfg: ModelConfig) -> int:
    """Parameters touched by matmuls per token (the input embedding is a gather)."""
    return models.count_params(cfg) - cfg.vocab_size * cfg.d_model * (not cfg.tie_embeddings)


def _attention_flops(cfg: ModelConfig, queries: float, keys: float) -> float:
    """QK^T and PV: 2 matmuls of 2 FLOPs per multiply-add, per query-key pair and head."""
    return 4.0 * queries * keys * cfg.num_heads * cfg.head_dim * cfg.num_layers


def decode_costs(cfg: ModelConfig, batch: int, context: float, weight_bytes: int) -> Costs:
    """One decode step at ``context`` tokens per sequence: every weight and the KV read once."""
    matmul_params = _matmul_params(cfg)
    flops = 2.0 * batch * matmul_params + _attention_flops(cfg, batch, context)
    read_weights = weight_bytes * matmul_params / models.count_params(cfg)
    return Costs(flops, read_weights + batch * context * kv_bytes_per_token(cfg))


def prefill_costs(cfg: ModelConfig, batch: int, length: int, weight_bytes: int) -> Costs:
    """A causal forward over ``length`` tokens per sequence (half the QK^T pairs)."""
    flops = 2.0 * batch * length * _matmul_params(cfg)
    flops += _attention_flops(cfg, batch * length, length / 2)
    return Costs(flops, weight_bytes + batch * length * kv_bytes_per_token(cfg))


def device_roofline() -> hardware.Chip:
    """The running device's catalog entry, or a measured one on the CPU."""
    dev = jax.devices()[0]
    return hardware.measure_cpu() if dev.platform == "cpu" else hardware.detect(dev)


def _roofline_fields(chip, costs: Costs, seconds: float, dtype: str) -> dict:
    bound = hardware.roofline_time(chip, flops=costs.flops, bytes=costs.bytes, dtype=dtype)
    compute_s = costs.flops / chip.peak(dtype)
    return {
        "flops": costs.flops,
        "hbm_bytes": costs.bytes,
        "roofline_s": bound,
        "roofline_fraction": bound / seconds,
        "bound": "compute" if compute_s >= costs.bytes / chip.hbm_bandwidth else "memory",
        "achieved_flops_per_s": costs.flops / seconds,
        "achieved_bytes_per_s": costs.bytes / seconds,
        "hbm_bandwidth_fraction": costs.bytes / seconds / chip.hbm_bandwidth,
    }


def _peak_dtype(chip, dtype: str) -> str:
    return dtype if dtype in chip.peak_flops else next(iter(chip.peak_flops))


def decode_state_bytes(model, batch: int, max_len: int) -> int:
    """Bytes of the decode state ``model.init_state(batch, max_len)`` as allocated: KV caches
    grow with ``max_len``; recurrent states (Mamba-2, RG-LRU, linear attention) and ring
    buffers do not. Shapes only (``jax.eval_shape``): nothing is allocated."""
    return int(state_bytes(jax.eval_shape(lambda: model.init_state(batch, max_len))))


def bench_generate(
    model,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int = 3,
    chip=None,
    label: str | None = None,
    seed: int = 0,
    prefill_chunk: int | None = None,
) -> list[dict]:
    """Time ``models.generate`` (greedy) and report prefill and decode records.

    Each record: ``phase``, ``batch``, ``prompt_len``, ``new_tokens``, ``seconds`` (median
    over ``repeats`` after one compile-and-warm-up run), ``tokens_per_s``, ``ms_per_token``
    (decode: per step), parameter bytes, ``kv_bytes`` (the attention-cache formula of
    ``kv_bytes_per_token``), ``state_bytes`` (the decode state as allocated, ``decode_state_bytes``)
    and the roofline fields.
    """
    cfg = model.config
    chip = chip or device_roofline()
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    # Stop tokens none, so every row decodes exactly new_tokens tokens.
    gen = lambda: models.generate(
        model, prompts, max_new_tokens=new_tokens, prefill_chunk=prefill_chunk
    )
    gen()
    runs = [gen() for _ in range(repeats)]
    prefill_s = statistics.median(r.stats["prefill_s"] for r in runs)
    decode_s = statistics.median(r.stats["decode_s"] for r in runs)
    steps = runs[0].stats["decode_steps"]
    wbytes = param_bytes(model)
    base = {
        "model": label or cfg.name,
        "impl": "kestrel",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dtype": cfg.dtype,
        "device": chip.name,
        "param_bytes": wbytes,
        "kv_bytes": batch * (prompt_len + new_tokens) * kv_bytes_per_token(cfg),
        "state_bytes": decode_state_bytes(model, batch, runs[0].stats["cache_len"]),
        "cache_len": runs[0].stats["cache_len"],
    }
    dtype = _peak_dtype(chip, cfg.dtype)
    prefill = prefill_costs(cfg, batch, prompt_len, wbytes)
    step_s = decode_s / max(steps, 1)
    decode = decode_costs(cfg, batch, prompt_len + new_tokens / 2, wbytes)
    return [
        {
            **base,
            "phase": "prefill",
            "seconds": prefill_s,
            "tokens_per_s": batch * prompt_len / prefill_s,
            "ms_per_token": 1e3 * prefill_s / prompt_len,
            **_roofline_fields(chip, prefill, prefill_s, dtype),
        },
        {
            **base,
            "phase": "decode",
            "seconds": decode_s,
            "tokens_per_s": batch * steps / decode_s,
            "ms_per_token": 1e3 * step_s,
            **_roofline_fields(chip, decode, step_s, dtype),
        },
    ]


def bench_hf_generate(
    model, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3, seed: int = 0
) -> list[dict]:
    """The same measurement with Hugging Face ``transformers`` greedy generation on torch.

    The Kestrel model is exported with ``models.hf.save_pretrained`` so both run identical
    weights. Needs ``torch`` and ``transformers`` (the ``test`` extra).
    """
    import tempfile

    import torch
    import transformers

    from models import hf

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = model.config
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(model, tmp)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf_model.eval()
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (batch, prompt_len)))
    opts = dict(
        attention_mask=torch.ones_like(ids),  # else HF masks prompt tokens equal to the pad id
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )

    def timed(fn):
        with torch.inference_mode():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    prefill_s = timed(lambda: hf_model(ids))
    total_s = timed(lambda: hf_model.generate(ids, **opts))
    decode_s = max(total_s - prefill_s, 1e-9)
    base = {
        "model": cfg.name,
        "impl": "hf-transformers",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dtype": "float32",
        "device": "cpu (torch)",
    }
    return [
        {
            **base,
            "phase": "prefill",
            "seconds": prefill_s,
            "tokens_per_s": batch * prompt_len / prefill_s,
        },
        {
            **base,
            "phase": "decode",
            "seconds": decode_s,
            "tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "ms_per_token": 1e3 * decode_s / (new_tokens - 1),
        },
    ]


def per_device_share(chip: hardware.Chip, num_devices: int) -> hardware.Chip:
    """A host CPU's measured roofline split between ``num_devices`` fake devices (they share
    its cores and memory); accelerators are returned unchanged."""
    if jax.devices()[0].platform != "cpu" or num_devices == 1:
        return chip
    return dataclasses.replace(
        chip,
        name=f"{chip.name} / {num_devices} devices",
        peak_flops={k: v / num_devices for k, v in chip.peak_flops.items()},
        hbm_bandwidth=chip.hbm_bandwidth / num_devices,
    )


def bench_planned(model, *, batch: int, prompt_len: int, new_tokens: int, chip=None, **kw):
    """``bench_generate`` under the planner's best decode plan over every device, with the
    plan's predicted prefill and decode step times beside the measured ones.

    Adds ``plan`` (layout and mesh), ``predicted_s`` (prefill: the whole prompt; decode: one
    step at the cache length) and ``measured_over_predicted`` to each record.
    """
    from partitioning import cost, planner

    cfg = model.config
    chip = per_device_share(chip or device_roofline(), jax.device_count())
    cache_len = prompt_len + new_tokens
    best = planner.auto(cfg, phase="decode", batch=batch, context=cache_len, chip=chip)
    with planner.use(best, model):
        records = bench_generate(
            model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, chip=chip, **kw
        )
    dtypes = dict(
        weights_dtype=planner._PLAN_DTYPES[cfg.param_dtype],
        kv_dtype=planner._PLAN_DTYPES[cfg.dtype],
        activation_dtype=planner._PLAN_DTYPES[cfg.dtype],
        compute_dtype=_peak_dtype(chip, cfg.dtype),
    )
    for r in records:
        phase = r["phase"]
        context = prompt_len if phase == "prefill" else r["cache_len"]
        est = cost.estimate(cfg, best.layout, phase=phase, batch=batch, context=context, **dtypes)
        measured = r["seconds"] if phase == "prefill" else r["ms_per_token"] / 1e3
        r.update(
            plan={**best.layout.describe(), "mesh": best.mesh_shape},
            predicted_s=est.step_time_s,
            measured_s=measured,
            measured_over_predicted=measured / est.step_time_s,
        )
    return records
