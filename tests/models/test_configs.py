"""Presets: exact parameter counts against published numbers and a closed-form count."""

import pytest

import models

# Exact totals as published with the checkpoints (sum of tensor sizes in each model's
# safetensors index) and, for TinyLlama, in the paper.
EXACT = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "tinyllama-1.1b": 1_100_048_384,
}
# PaLM Table 1 (arXiv:2204.02311) gives billions to two decimals.
PALM_BILLIONS = {"palm-8b": 8.63, "palm-62b": 62.50, "palm-540b": 540.35}


def closed_form(cfg: models.ModelConfig) -> int:
    """Parameters of the decoder from its shapes alone (no biases, RMS/scale-only norms)."""
    D, F, V, L = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.num_layers
    attn = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = (3 if cfg.mlp in ("swiglu", "geglu") else 2) * D * F
    norms = (1 if cfg.parallel_block else 2) * D
    head = 0 if cfg.tie_embeddings else D * V
    return V * D + L * (attn + mlp + norms) + D + head


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_parameter_counts(name):
    cfg = models.get_config(name)
    assert models.count_params(cfg) == EXACT[name]
    assert closed_form(cfg) == EXACT[name]


@pytest.mark.parametrize("name", sorted(PALM_BILLIONS))
def test_palm_counts_match_table_1(name):
    cfg = models.get_config(name)
    count = models.count_params(cfg)
    assert count == closed_form(cfg)
    assert abs(count / 1e9 - PALM_BILLIONS[name]) < 0.01
    assert cfg.num_kv_heads == 1 and cfg.parallel_block and cfg.vocab_size == 256_000


def test_every_preset_cites_a_source_and_builds_abstractly():
    names = models.list_configs()
    assert "dense-tiny" in names and len(names) >= 12
    for name in names:
        cfg = models.get_config(name)
        assert cfg.source, name
        assert models.count_params(cfg) == closed_form(cfg), name


def test_config_round_trips_through_dict():
    cfg = models.get_config("llama-3.1-8b")
    assert models.ModelConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # usable as a jit static argument
