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
    # Mixtral: 8 x 3 x 4096 x 14336 expert weights per layer dominate; the published
    # "46.7B total". Qwen1.5-MoE-A2.7B: "14.3B total" on its model card; both closed form.
    "mixtral-8x7b": 46_702_792_704,
    "qwen1.5-moe-a2.7b": 14_315_784_192,
    # state-spaces/mamba2-2.7b (vocabulary padded to 50288, tied): equal to transformers'
    # Mamba2ForCausalLM on the meta device (tests/models/test_hf_mamba2.py).
    "mamba2-2.7b": 2_702_599_680,
    # RecurrentGemma-2B: "2.7B" in arXiv:2404.07839 Table 1; this total is what transformers'
    # RecurrentGemmaForCausalLM has for google/recurrentgemma-2b's config (counted on the meta
    # device in tests/models/test_hf_recurrentgemma.py), and the closed form below.
    "recurrentgemma-2b": 2_682_862_080,
}
# Parameters one token uses (``models.count_active_params``): Mixtral's "12.9B active"
# (arXiv:2401.04088 §2 says 13B), Qwen1.5-MoE-A2.7B's "2.7B activated" (model card).
ACTIVE = {
    "mixtral-8x7b": 12_879_925_248,
    "qwen1.5-moe-a2.7b": 2_689_173_504,
}
# PaLM Table 1 (arXiv:2204.02311) gives billions to two decimals.
PALM_BILLIONS = {"palm-8b": 8.63, "palm-62b": 62.50, "palm-540b": 540.35}


def closed_form(cfg: models.ModelConfig, *, active: bool = False) -> int:
    """Parameters of the decoder from its shapes alone (no MLP or output biases, RMS/scale-only
    norms); ``active``: only the ``experts_per_token`` routed experts a token uses."""
    if "mamba2" in cfg.mixer_pattern:
        return _closed_form_mamba2(cfg)
    D, F, V, L = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.num_layers
    attn = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    attn += cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads) if cfg.qkv_bias else 0
    attn += D if cfg.out_bias else 0
    matrices = 3 if cfg.mlp in ("swiglu", "geglu") else 2
    mlp = matrices * D * F + ((matrices - 1) * F + D if cfg.mlp_bias else 0)
    experts = cfg.experts_per_token if active else cfg.num_experts
    moe = D * cfg.num_experts + experts * matrices * D * cfg.expert_ffn_dim
    moe += matrices * D * cfg.shared_ffn_dim + (D if cfg.shared_expert_gate else 0)
    channels = sum(moe if cfg.channel(i) == "moe" else mlp for i in range(L))
    norms = (1 if cfg.parallel_block else 2) * D
    head = 0 if cfg.tie_embeddings else D * V
    # Early-exit heads: a norm per exit, plus its own output head when "separate".
    head += len(cfg.exit_layers) * (D + (D * V if cfg.exit_head == "separate" else 0))
    mixer = dict(rglru=_rglru(cfg), based=_based(cfg), gla=_gla(cfg), retnet=_retnet(cfg))
    mixers = sum(mixer.get(cfg.mixer(i), attn) for i in range(L))
    return V * D + mixers + L * norms + channels + D + head


def _rglru(cfg: models.ModelConfig) -> int:
    """Griffin's recurrent block: x/y/out linears with biases, depthwise conv with bias,
    block-diagonal input and recurrence gates with biases, and Λ."""
    D, R, W = cfg.d_model, cfg.rnn_width, cfg.lru_conv_width
    return 3 * D * R + 2 * R + D + W * R + R + 2 * (R * R // cfg.rnn_heads + R) + R


def _based(cfg: models.ModelConfig) -> int:
    """Based linear attention: q/k ``[D, N, d']``, v ``[D, N, V]``, o ``[N, V, D]``."""
    D, N, F, V = cfg.d_model, cfg.lin_heads, cfg.linear_attn_feature_dim, cfg.lin_value_dim
    return D * N * (2 * F + 2 * V)


def _gla(cfg: models.ModelConfig) -> int:
    """GLA: q/k ``[D, N, K]``, v/r/o ``N V D`` each (r with bias ``[N, V]``), low-rank gate
    ``[D, R]`` then ``[R, N, K]`` with bias ``[N, K]``, per-head norm scale ``[N, V]``."""
    D, N, K, V, R = (
        cfg.d_model,
        cfg.lin_heads,
        cfg.lin_key_dim,
        cfg.lin_value_dim,
        cfg.gla_gate_rank,
    )
    return 2 * D * N * K + 3 * D * N * V + N * V + D * R + R * N * K + N * K + N * V


def _retnet(cfg: models.ModelConfig) -> int:
    """RetNet: q/k ``[D, N, K]``, v/g/o ``N V D`` each, GroupNorm scale ``[N, V]``."""
    D, N, K, V = cfg.d_model, cfg.lin_heads, cfg.lin_key_dim, cfg.lin_value_dim
    return 2 * D * N * K + 3 * D * N * V + N * V


# Linear-attention test presets (byte vocabulary 264, d_model 64, 4 heads, SwiGLU 128 unless
# noted): embeddings and head 2 x 264 x 64, per layer two norms and the MLP, plus the mixers.
# based-tiny: 2 Based (d' = 8, V = 16) + 2 local attention layers (GQA 4/2 x 16); gla-tiny:
# K = 8, V = 16, rank 16; retnet-tiny: K = 16, V = 32, GELU MLP of 2 matrices.
LINEAR_ATTENTION = {
    "based-tiny": 33_856 + 4 * (128 + 24_576) + 2 * 12_288 + 2 * 12_288,  # 181,824
    "gla-tiny": 33_856 + 2 * (128 + 24_576 + 18_080),  # 119,424
    "retnet-tiny": 33_856 + 2 * (128 + 16_384 + 32_896),  # 132,672
}


@pytest.mark.parametrize("name", sorted(LINEAR_ATTENTION))
def test_linear_attention_parameter_counts(name):
    cfg = models.get_config(name)
    assert models.count_params(cfg) == closed_form(cfg) == LINEAR_ATTENTION[name]


def _closed_form_mamba2(cfg: models.ModelConfig) -> int:
    """Mamba-2 (and hybrid) stacks: per layer ``in_proj [D, 2I + 2GN + H]``, depthwise conv
    ``[C, W]`` + bias over ``C = I + 2GN``, ``dt_bias``/``A_log``/``D`` per head, gated-norm
    scale ``[I]``, ``out_proj [I, D]``; attention layers as above; MLP or no channel."""
    D, V, L, F = cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.ffn_dim
    inner, H, G, N = cfg.ssm_intermediate, cfg.ssm_heads, cfg.ssm_groups, cfg.ssm_state_size
    C = inner + 2 * G * N
    ssm = D * (inner + C + H) + C * (cfg.ssm_conv_kernel + cfg.ssm_conv_bias) + 3 * H
    ssm += inner + inner * D
    attn = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = (3 if cfg.mlp in ("swiglu", "geglu") else 2) * D * F
    total = V * D + D + (0 if cfg.tie_embeddings else D * V)
    for i in range(L):
        total += (ssm if cfg.mixer(i) == "mamba2" else attn) + D
        total += 0 if cfg.channel(i) == "none" else mlp + D
    return total


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_parameter_counts(name):
    cfg = models.get_config(name)
    assert models.count_params(cfg) == EXACT[name]
    assert closed_form(cfg) == EXACT[name]


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_active_parameter_counts(name):
    cfg = models.get_config(name)
    assert models.count_active_params(cfg) == ACTIVE[name]
    assert closed_form(cfg, active=True) == ACTIVE[name]


def test_published_moe_totals():
    count = lambda name: models.count_params(models.get_config(name))
    active = lambda name: models.count_active_params(models.get_config(name))
    assert (
        round(count("mixtral-8x7b") / 1e9, 1) == 46.7 and round(active("mixtral-8x7b") / 1e9) == 13
    )
    assert round(count("qwen1.5-moe-a2.7b") / 1e9, 1) == 14.3
    assert round(active("qwen1.5-moe-a2.7b") / 1e9, 1) == 2.7
    dense = models.get_config("dense-tiny")
    assert models.count_active_params(dense) == models.count_params(dense)


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
        assert models.count_active_params(cfg) == closed_form(cfg, active=True), name


def test_config_round_trips_through_dict():
    cfg = models.get_config("llama-3.1-8b")
    assert models.ModelConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # usable as a jit static argument
