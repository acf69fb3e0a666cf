"""Mixtral and Qwen2-MoE import/export against tiny random transformers models built here.

Both dispatch paths (dropless and capacity with room for every token) must give
transformers' logits; the load-balancing loss must equal transformers' ``aux_loss``; greedy
generation must equal ``generate(do_sample=False)``; saved checkpoints must load back into
transformers with the same logits.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import models
from models import hf
from models.hf import safetensors as st

ATTENTION = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=128,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    attn_implementation="eager",
)
CASES = {
    "mixtral": (
        transformers.MixtralConfig,
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    # Layer 1 dense (mlp_only_layers), shared expert with its gate, raw top-k probabilities.
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            intermediate_size=80,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
    ),
}
ATOL = 1e-4


def _hf_model(name, seed=0):
    config_cls, extra = CASES[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**ATTENTION, **extra)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if pname.endswith("norm.weight") else 0.2 * noise)
    return model


def _tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, ATTENTION["vocab_size"], (batch, length))


def _hf_out(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens), output_router_logits=True)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _ours(model, tokens):
    return _jit_forward(*nnx.split(model), np.asarray(tokens, np.int32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name)`` -> (HF model, directory written by HF ``save_pretrained``), cached."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = model, str(path)
        return cache[name]

    return get


def test_checkpoint_names_are_what_transformers_saves(saved):
    """transformers 5.24 stores experts fused in memory but saves them per expert."""
    names = set(st.Checkpoint(saved("mixtral")[1]))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    names = set(st.Checkpoint(saved("qwen2_moe")[1]))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names  # the dense layer


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_load_matches_transformers(saved, name, dispatch):
    ref_model, path = saved(name)
    tokens = _tokens()
    want = _hf_out(ref_model, tokens)
    model = hf.load_pretrained(path)
    cfg = model.config
    assert cfg.hf_architecture == type(ref_model).__name__
    if dispatch == "capacity":  # C = G: every expert can take every token
        k_over_e = cfg.experts_per_token / cfg.num_experts
        model = _reconfigure(model, moe_dispatch="capacity", capacity_factor=1 / k_over_e)
    out = _ours(model, tokens)
    assert isinstance(out, models.LMOutput) and out.logits.shape == (2, 24, 128)
    np.testing.assert_allclose(out.logits, want.logits.numpy(), atol=ATOL, rtol=0)
    assert float(out.router_stats["dropped_fraction"]) == 0.0
    # transformers' aux_loss is the unweighted load-balancing loss, pooled over layers.
    lb = float(out.router_stats["load_balance_loss"])
    np.testing.assert_allclose(lb, float(want.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(float(out.aux_loss), cfg.router_aux_loss_coef * lb, rtol=1e-6)


def _reconfigure(model, **overrides):
    other = models.build(model.config.replace(**overrides))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


def test_config_mapping():
    mixtral = hf.config_from_hf({**ATTENTION, **CASES["mixtral"][1], "model_type": "mixtral"})
    assert mixtral.channel_pattern == ("moe",) and mixtral.router_renormalize
    assert mixtral.rope_theta == 1e6 and mixtral.norm_eps == 1e-5 and mixtral.expert_ffn_dim == 48
    # Sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0, as the
    # layers transformers builds say.
    raw = dict(
        ATTENTION,
        **CASES["qwen2_moe"][1],
        num_hidden_layers=6,
        decoder_sparse_step=2,
        model_type="qwen2_moe",
    )
    raw["mlp_only_layers"] = [3]
    ref = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2MoeConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    )
    sparse = tuple(
        "moe" if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" else "mlp"
        for layer in ref.model.layers
    )
    assert sparse == ("mlp", "moe", "mlp", "mlp", "mlp", "moe")
    cfg = hf.config_from_hf(raw)
    assert tuple(cfg.channel(i) for i in range(6)) == sparse
    assert not cfg.router_renormalize and cfg.shared_expert_gate and cfg.qkv_bias
    assert models.count_params(cfg) == sum(p.numel() for p in ref.parameters())
    again = hf.config_from_hf(hf.config_to_hf(cfg))
    assert again.replace(name="x") == cfg.replace(name="x")


def _generate_hf(ref_model, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        return ref_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_generation_matches_transformers(saved, name):
    """Ragged batch (5, 11, 17 tokens): padding rows are routed too and must not matter."""
    ref_model, path = saved(name)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 128, n).tolist() for n in (5, 11, 17)]
    out = models.generate(hf.load_pretrained(path), prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, out.tokens, strict=True):
        assert got == _generate_hf(ref_model, prompt, 32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_round_trip_through_transformers(saved, name, tmp_path):
    ref_model, path = saved(name)
    hf.save_pretrained(hf.load_pretrained(path), tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(again) is type(ref_model)
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob"):
        assert getattr(again.config, key, None) == getattr(ref_model.config, key, None), key
    for key in ("mlp_only_layers", "moe_intermediate_size", "shared_expert_intermediate_size"):
        assert getattr(again.config, key, None) == getattr(ref_model.config, key, None), key
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(
        _hf_out(again, tokens).logits, _hf_out(ref_model, tokens).logits, atol=1e-5, rtol=0
    )


def test_native_moe_tiny_loads_in_transformers(tmp_path):
    model = models.build(models.get_config("moe-tiny"), seed=1)
    rng = np.random.default_rng(2)
    values = {
        p: 0.2 * rng.standard_normal(v[...].shape).astype(np.float32)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    nnx.update(model, nnx.from_flat_state(values))
    hf.save_pretrained(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(ref).__name__ == "MixtralForCausalLM"
    tokens = _tokens(seed=2)
    np.testing.assert_allclose(
        _hf_out(ref, tokens).logits, _ours(model, tokens).logits, atol=ATOL, rtol=0
    )


def test_load_fused_expert_layout(saved, tmp_path):
    """transformers 5's in-memory layout (``mlp.experts.gate_up_proj`` [E, 2F, D],
    ``down_proj`` [E, D, F], Mixtral's ``block_sparse_moe.`` renamed ``mlp.``) loads too."""
    ref_model, path = saved("mixtral")
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
    st.save_file(state, tmp_path / st.SINGLE_FILE)
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(json.dumps(json.load(f)))
    tokens = _tokens(seed=3)
    np.testing.assert_allclose(
        _ours(hf.load_pretrained(tmp_path), tokens).logits,
        _hf_out(ref_model, tokens).logits,
        atol=ATOL,
        rtol=0,
    )


def test_save_rejects_what_the_architecture_cannot_express(tmp_path):
    cfg = models.get_config("moe-tiny", shared_ffn_dim=32)
    with pytest.raises(hf.ConversionError, match="Mixtral has no shared expert"):
        hf.save_pretrained(models.build(cfg), tmp_path)
    cfg = models.get_config("moe-tiny", channel_pattern=("moe", "mlp"))
    with pytest.raises(hf.ConversionError, match="every layer must be 'moe'"):
        hf.save_pretrained(models.build(cfg), tmp_path)
    qwen = dict(ATTENTION, **CASES["qwen2_moe"][1], model_type="qwen2_moe")
    with pytest.raises(hf.ConversionError, match="shared_expert_intermediate_size"):
        hf.config_from_hf({**qwen, "shared_expert_intermediate_size": 0})
    with pytest.raises(hf.ConversionError, match="decoder_sparse_step"):
        hf.config_from_hf({**qwen, "decoder_sparse_step": 0})
