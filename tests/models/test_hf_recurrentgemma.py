"""RecurrentGemma import/export against a tiny random transformers model built here (CPU torch).

The attention window (8) is shorter than every sequence, so local attention's masking and ring
buffer both matter; ``lru_width`` (48) differs from ``hidden_size`` (64) to catch transposes.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import models
from models import hf

VOCAB = 128
TINY = dict(
    num_hidden_layers=3,
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=192,
    num_attention_heads=4,
    num_key_value_heads=1,
    attention_window_size=8,
    lru_width=48,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
ATOL = 1e-4
# google/recurrentgemma-2b config.json (the shape fields the importer reads).
RECURRENTGEMMA_2B = {
    "architectures": ["RecurrentGemmaForCausalLM"],
    "model_type": "recurrent_gemma",
    "attention_bias": False,
    "attention_window_size": 2048,
    "block_types": ["recurrent", "recurrent", "attention"],
    "conv1d_width": 4,
    "embeddings_scale_by_sqrt_dim": True,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2560,
    "intermediate_size": 15360,
    "logits_soft_cap": 30.0,
    "lru_width": 2560,
    "num_attention_heads": 10,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "vocab_size": 256000,
}


def _hf_model(seed=0):
    config = transformers.RecurrentGemmaConfig(**TINY, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.RecurrentGemmaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    # Random norms (HF's zeros would hide the 1 + w), biases and gates; small embeddings so
    # that greedy generation does not collapse onto one token.
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.05 if "embed" in name else 1.0 if "recurrent_param" in name else 0.3
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _hf_model()
    path = tmp_path_factory.mktemp("recurrentgemma")
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def ours(saved):
    return hf.load_pretrained(saved[1])


def _tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens), use_cache=False).logits.float().numpy()


def test_config_mapping(saved, ours):
    cfg = ours.config
    assert cfg.mixer_pattern == ("rglru", "rglru", "local_attention")
    assert (cfg.sliding_window, cfg.rnn_width, cfg.rnn_heads, cfg.ffn_dim) == (8, 48, 4, 96)
    assert (cfg.head_dim, cfg.rope_fraction, cfg.final_logit_softcap) == (16, 0.5, 30.0)
    assert cfg.embed_scale == 8.0 and cfg.norm == "rms_plus_one" and cfg.tie_embeddings
    assert models.count_params(ours) == sum(p.numel() for p in saved[0].parameters())


def test_logits_match_transformers(saved, ours):
    tokens = _tokens()
    np.testing.assert_allclose(
        np.asarray(ours(jnp.asarray(tokens, jnp.int32))), _hf_logits(saved[0], tokens), atol=ATOL
    )


def test_greedy_generation_matches_transformers_past_the_window(saved, ours):
    prompts = [_tokens(1, 5, seed=1)[0].tolist(), _tokens(1, 11, seed=2)[0].tolist()]
    result = models.generate(ours, prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, result.tokens, strict=True):
        with torch.no_grad():
            out = saved[0].generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        want = out[0, len(prompt) :].tolist()
        assert len(set(want)) > 8  # a non-degenerate continuation
        assert got == want


def test_export_round_trip(saved, ours, tmp_path):
    hf.save_pretrained(ours, tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert hf.config_from_hf(json.load(f)) == ours.config.replace(name="hf-recurrent_gemma")
    back = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens(1, 16, seed=3)
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(saved[0], tokens), atol=1e-6)


def test_recurrentgemma_2b_config_and_count():
    cfg = hf.config_from_hf(RECURRENTGEMMA_2B)
    preset = models.get_config("recurrentgemma-2b")
    fields = ("mixer_pattern", "ffn_dim", "head_dim", "num_kv_heads", "sliding_window")
    fields += ("embed_scale", "rope_fraction", "rnn_width", "rnn_heads", "lru_conv_width")
    assert all(getattr(cfg, f) == getattr(preset, f) for f in fields)
    with torch.device("meta"):
        config = transformers.RecurrentGemmaConfig(
            **{k: v for k, v in RECURRENTGEMMA_2B.items() if k not in ("architectures",)}
        )
        reference = transformers.RecurrentGemmaForCausalLM(config)
    count = sum(p.numel() for p in reference.parameters())
    assert models.count_params(cfg) == models.count_params(preset) == count == 2_682_862_080


def test_unsupported_features_are_errors():
    with pytest.raises(hf.ConversionError, match="block_types"):
        hf.config_from_hf({**RECURRENTGEMMA_2B, "block_types": ["recurrent", "mamba"]})
    with pytest.raises(hf.ConversionError, match="hidden_activation"):
        hf.config_from_hf({**RECURRENTGEMMA_2B, "hidden_activation": "relu"})
    with pytest.raises(hf.ConversionError, match="embed_scale"):
        hf.config_to_hf(models.get_config("griffin-tiny", embed_scale=1.0))
