"""Mamba2ForCausalLM import/export against a tiny random transformers model built here.

Two B/C groups, a chunk size (5) smaller than and not dividing the sequence, conv bias and
random non-trivial ``A_log``/``D``/``dt_bias``/norm weights: float32 logits within 1e-4 of
transformers (its chunked ``torch_forward``), greedy generation equal to ``generate``, and a
saved checkpoint that transformers loads back to the same logits.
"""

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import models
from models import hf

ATOL = 1e-4
HF_CONFIG = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_heads=8,
    head_dim=8,
    expand=2,
    n_groups=2,
    state_size=8,
    conv_kernel=4,
    chunk_size=5,
    use_conv_bias=True,
    use_bias=False,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


@functools.cache
def _hf_dir(tmp_root: str, tie: bool = False) -> str:
    torch.manual_seed(0)
    config = transformers.Mamba2Config(**{**HF_CONFIG, "tie_word_embeddings": tie})
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # make every parameter matter (the init leaves D = 1, norms = 1)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.empty_like(p).uniform_(-1.0, 1.0))
            elif name.endswith(("D", "norm.weight", "norm_f.weight", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    path = os.path.join(tmp_root, f"mamba2_tie{int(tie)}")
    model.save_pretrained(path)
    return path


def _hf_model(path):
    return transformers.Mamba2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_mamba2"))


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, HF_CONFIG["vocab_size"], shape)


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tmp_root, tie):
    path = _hf_dir(tmp_root, tie)
    ours = hf.load_pretrained(path)
    cfg = ours.config
    assert (cfg.mixer_pattern, cfg.channel_pattern) == (("mamba2",), ("none",))
    assert (cfg.ssm_heads, cfg.ssm_groups, cfg.ssm_chunk_size) == (8, 2, 5)
    assert cfg.tie_embeddings == tie
    tokens = _tokens((2, 13))
    with torch.no_grad():
        want = _hf_model(path)(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert models.count_params(ours) == sum(p.numel() for p in _hf_model(path).parameters())


def test_greedy_generation_matches_transformers(tmp_root):
    path = _hf_dir(tmp_root)
    ours, theirs = hf.load_pretrained(path), _hf_model(path)
    prompts = [_tokens(7, seed=1).tolist(), _tokens(3, seed=2).tolist()]
    got = models.generate(ours, prompts, max_new_tokens=32).tokens
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = theirs.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32
            )
        assert tokens == out[0, len(prompt) :].tolist()


def test_save_pretrained_round_trips_through_transformers(tmp_root, tmp_path):
    ours = hf.load_pretrained(_hf_dir(tmp_root))
    hf.save_pretrained(ours, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Mamba2ForCausalLM"]
    tokens = _tokens((1, 9), seed=3)
    with torch.no_grad():
        want = _hf_model(str(tmp_path))(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    again = hf.load_pretrained(tmp_path)
    assert again.config == ours.config


def test_hybrid_and_bad_configs_are_rejected():
    with pytest.raises(hf.ConversionError, match="mixer_pattern"):
        cfg = models.get_config("mamba2-hybrid-tiny", hf_architecture="Mamba2ForCausalLM")
        hf.config_to_hf(cfg)
    bad = {"architectures": ["Mamba2ForCausalLM"], **HF_CONFIG, "num_heads": 7}
    with pytest.raises(hf.ConversionError, match="num_heads"):
        hf.config_from_hf(bad)


def test_mamba2_2_7b_count_equals_transformers_on_meta_device():
    """The preset's exact count (tests/models/test_configs.py) against transformers' module."""
    cfg = models.get_config("mamba2-2.7b")
    hf_cfg = {k: v for k, v in hf.config_to_hf(cfg).items() if k not in ("architectures",)}
    config = transformers.Mamba2Config(**{**hf_cfg, "dtype": None, "torch_dtype": None})
    with torch.device("meta"):
        theirs = transformers.Mamba2ForCausalLM(config)
    assert sum(p.numel() for p in theirs.parameters()) == models.count_params(cfg) == 2_702_599_680
