"""``config.json`` of Hugging Face Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE <-> ``ModelConfig``.

Semantics follow transformers 5 (checked against 5.24's sources):

* ``configuration_{llama,mistral,qwen2}.py``: class defaults for keys a ``config.json`` omits
  (``_HF_DEFAULTS``); Llama's ``attention_bias`` covers q, k, v *and* o; Qwen2 always has q/k/v
  biases and no o bias (``modeling_qwen2.Qwen2Attention``); Mistral has no biases.
* ``modeling_rope_utils.convert_rope_params_to_dict`` / ``standardize_rope_params``: RoPE lives
  in ``rope_parameters`` (``rope_type``, ``rope_theta``, scaling fields); a legacy
  ``rope_scaling`` dict overrides it, a legacy top-level ``rope_theta`` fills a missing theta,
  ``type`` is the legacy spelling of ``rope_type``, and llama3's
  ``original_max_position_embeddings`` defaults to ``max_position_embeddings``.
* ``masking_utils.sliding_window_overlay``: a key is visible iff ``kv_idx > q_idx - window``,
  i.e. ``(p - w, p]``, the same as ``ModelConfig.sliding_window``. Mistral windows every layer
  (``sliding_window: null`` means none; absent means the class default 4096). Qwen2 windows the
  layers whose ``layer_types`` entry is ``"sliding_attention"``, with
  ``sliding_window`` only if ``use_sliding_window``; without ``layer_types`` a layer ``i`` slides
  iff ``i >= max_window_layers`` (``Qwen2Config.__post_init__``). Mixtral windows every layer as
  Mistral does; Qwen2-MoE as Qwen2, but its default ``layer_types`` slide the even layers below
  ``max_window_layers`` (``Qwen2MoeConfig.__post_init__``).
* Mixture of experts (``modeling_mixtral`` / ``modeling_qwen2_moe``): softmax router, top
  ``num_experts_per_tok`` of ``num_local_experts`` (Mixtral) / ``num_experts`` (Qwen2-MoE),
  renormalised always (Mixtral) or iff ``norm_topk_prob`` (Qwen2-MoE). Mixtral's experts have
  ``intermediate_size``; Qwen2-MoE's have ``moe_intermediate_size``, plus a shared expert of
  ``shared_expert_intermediate_size`` behind a sigmoid gate, and a layer ``i`` is sparse iff
  ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`` (dense layers have
  ``intermediate_size``); that becomes ``channel_pattern``. ``output_router_logits`` only asks
  transformers to compute its aux loss; ``models.LM`` always reports it.
* RecurrentGemma (``configuration_recurrent_gemma`` / ``modeling_recurrent_gemma``):
  ``block_types`` repeat over the layers (``recurrent`` -> mixer ``"rglru"``, ``attention`` ->
  ``"local_attention"`` with window ``attention_window_size``); ``head_dim`` is always
  ``hidden_size // num_attention_heads`` (a ``head_dim`` key is ignored); the gated GELU MLP is
  ``intermediate_size // 2`` wide, with biases, as is ``o_proj`` (q/k/v biases iff
  ``attention_bias``); the RG-LRU gates have ``num_attention_heads`` blocks; embeddings are
  multiplied by ``sqrt(hidden_size)`` rounded to bfloat16 (the ``normalizer`` buffer);
  norms are ``(1 + w)`` RMSNorms; RoPE rotates ``partial_rotary_factor`` (default 0.5) of each
  head; logits are soft-capped at ``logits_soft_cap``; the output head is tied.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes

from models.configs import DTYPES, ModelConfig, RopeScaling, shortest_cycle

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Mamba2ForCausalLM": "mamba2",  # models.hf.mamba2
    "RecurrentGemmaForCausalLM": "recurrent_gemma",
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
SUPPORTED_ARCHITECTURES = tuple(sorted(MODEL_TYPES))
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Class defaults of transformers 5.24 for the keys read here (configuration_*.py).
_COMMON_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.02,
    head_dim=None,
    rope_theta=10000.0,
)
_HF_DEFAULTS = {
    "LlamaForCausalLM": dict(
        _COMMON_DEFAULTS,
        intermediate_size=11008,
        num_key_value_heads=None,
        max_position_embeddings=2048,
        attention_bias=False,
        mlp_bias=False,
    ),
    "MistralForCausalLM": dict(
        _COMMON_DEFAULTS,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        sliding_window=4096,
    ),
    "Qwen2ForCausalLM": dict(
        _COMMON_DEFAULTS,
        vocab_size=151936,
        intermediate_size=22016,
        num_key_value_heads=32,
        max_position_embeddings=32768,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        layer_types=None,
    ),
    "MixtralForCausalLM": dict(
        _COMMON_DEFAULTS,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.001,
    ),
    "Qwen2MoeForCausalLM": dict(
        _COMMON_DEFAULTS,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=32768,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        layer_types=None,
        decoder_sparse_step=1,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts_per_tok=4,
        num_experts=60,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        mlp_only_layers=None,
        qkv_bias=True,
    ),
}


class ConversionError(ValueError):
    """A config or checkpoint that cannot be converted (unsupported, inconsistent, mismatched)."""


def architecture(hf: dict) -> str:
    """The supported architecture named by ``architectures`` (or ``model_type``) of ``hf``."""
    names = list(hf.get("architectures") or [])
    if not names and hf.get("model_type"):
        names = [a for a, t in MODEL_TYPES.items() if t == hf["model_type"]] or [hf["model_type"]]
    for name in names:
        if name in MODEL_TYPES:
            return name
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ConversionError(
        f"unsupported architecture {names or '(none given)'}; supported: {supported}"
    )


def _rope(hf: dict, get) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    layer_types = set(hf.get("layer_types") or ())
    nested = [params[k] for k in params if k in layer_types]
    if nested:  # per-layer-type RoPE: supported only when every layer type agrees
        if any(p != nested[0] for p in nested):
            raise ConversionError(f"per-layer-type rope_parameters differ: {params}")
        params = nested[0]
    theta = float(params.get("rope_theta", get("rope_theta")))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"unsupported rope_type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(
            f"partial_rotary_factor={params['partial_rotary_factor']} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ConversionError(f"llama3 rope_parameters lack {missing}: {params}")
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_len=int(
            params.get("original_max_position_embeddings", get("max_position_embeddings"))
        ),
    )
    return theta, scaling


def _sliding(hf: dict, arch: str, get, num_layers: int):
    if arch == "LlamaForCausalLM":
        return None, None
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return get("sliding_window"), None
    window = get("sliding_window") if get("use_sliding_window") else None
    layer_types = get("layer_types")
    if layer_types is None:
        m = get("max_window_layers")
        if arch == "Qwen2MoeForCausalLM":
            slides = lambda i: (i + 1) % 2 == 1 and i < m
        else:
            slides = lambda i: i >= m
        layer_types = [
            "sliding_attention" if window is not None and slides(i) else "full_attention"
            for i in range(num_layers)
        ]
    if len(layer_types) != num_layers:
        raise ConversionError(
            f"layer_types has {len(layer_types)} entries for num_hidden_layers={num_layers}"
        )
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConversionError(
            f"unsupported layer_types {unknown}; supported: full_attention, sliding_attention"
        )
    layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    if layers and window is None:
        raise ConversionError(
            "layer_types has sliding_attention layers but no window (use_sliding_window is "
            "false or sliding_window is null)"
        )
    if not layers:
        return None, None
    return window, (None if len(layers) == num_layers else layers)


def _moe(hf: dict, arch: str, get, num_layers: int) -> dict:
    """The ``ModelConfig`` MoE fields of a Mixtral / Qwen2-MoE config."""
    if arch == "MixtralForCausalLM":
        return dict(
            channel_pattern=("moe",),
            num_experts=int(get("num_local_experts")),
            experts_per_token=int(get("num_experts_per_tok")),
            router_renormalize=True,
            router_aux_loss_coef=float(get("router_aux_loss_coef")),
        )
    step, num_experts = int(get("decoder_sparse_step")), int(get("num_experts"))
    if step < 1:
        raise ConversionError(f"decoder_sparse_step must be >= 1, got {step}")
    dense = set(get("mlp_only_layers") or ())
    pattern = tuple(
        "moe" if i not in dense and num_experts > 0 and (i + 1) % step == 0 else "mlp"
        for i in range(num_layers)
    )
    shared = int(get("shared_expert_intermediate_size"))
    if "moe" in pattern and shared < 1:
        raise ConversionError(
            "shared_expert_intermediate_size must be positive: Qwen2-MoE always has a shared "
            f"expert, got {shared}"
        )
    return dict(
        channel_pattern=shortest_cycle(pattern),
        num_experts=num_experts,
        experts_per_token=int(get("num_experts_per_tok")),
        moe_ffn_dim=int(get("moe_intermediate_size")),
        shared_ffn_dim=shared,
        shared_expert_gate=True,
        router_renormalize=bool(get("norm_topk_prob")),
        router_aux_loss_coef=float(get("router_aux_loss_coef")),
    )


_RG_DEFAULTS = dict(  # RecurrentGemmaConfig class defaults, transformers 5.24
    num_hidden_layers=26,
    vocab_size=256000,
    hidden_size=2560,
    intermediate_size=3 * 2560,
    num_attention_heads=10,
    lru_width=None,
    attention_window_size=2048,
    conv1d_width=4,
    logits_soft_cap=30.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    block_types=("recurrent", "recurrent", "attention"),
    num_key_value_heads=None,
    attention_bias=False,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    partial_rotary_factor=0.5,
)
_RG_BLOCKS = {"recurrent": "rglru", "attention": "local_attention"}


def _recurrent_gemma_from_hf(hf: dict) -> ModelConfig:
    get = lambda key: hf[key] if hf.get(key) is not None else _RG_DEFAULTS[key]
    if get("hidden_activation") != "gelu_pytorch_tanh":
        raise ConversionError(
            f"unsupported hidden_activation {get('hidden_activation')!r}; supported: "
            "gelu_pytorch_tanh"
        )
    if not get("tie_word_embeddings"):
        raise ConversionError("RecurrentGemma's output head is tied to its embeddings")
    unknown = sorted(set(get("block_types")) - set(_RG_BLOCKS))
    if unknown:
        raise ConversionError(f"unsupported block_types {unknown}; supported: {list(_RG_BLOCKS)}")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"RecurrentGemma supports only default RoPE, got {rope}")
    d, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    return ModelConfig(
        name="hf-recurrent_gemma",
        vocab_size=int(get("vocab_size")),
        d_model=d,
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=d // heads,
        ffn_dim=int(get("intermediate_size")) // 2,
        mlp="geglu",
        mlp_bias=True,
        qkv_bias=bool(get("attention_bias")),
        out_bias=True,
        norm="rms_plus_one",
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=True,
        rope_theta=float(rope.get("rope_theta", get("rope_theta"))),
        rope_fraction=float(rope.get("partial_rotary_factor", get("partial_rotary_factor"))),
        sliding_window=int(get("attention_window_size")),
        mixer_pattern=tuple(_RG_BLOCKS[b] for b in get("block_types")),
        embed_scale=float(ml_dtypes.bfloat16(d**0.5)),
        final_logit_softcap=float(get("logits_soft_cap")),
        lru_width=int(get("lru_width") or d),
        lru_heads=heads,
        lru_conv_width=int(get("conv1d_width")),
        # RecurrentGemma has no position limit; 8192 is its training length (arXiv:2404.07839).
        max_seq_len=int(hf.get("max_position_embeddings") or 8192),
        hf_architecture="RecurrentGemmaForCausalLM",
        source="Hugging Face config.json",
    )


def _recurrent_gemma_to_hf(cfg: ModelConfig, require) -> dict:
    blocks = {v: k for k, v in _RG_BLOCKS.items()}
    require(set(cfg.mixer_pattern) <= set(blocks), f"mixer_pattern={cfg.mixer_pattern}")
    require(set(cfg.channel_pattern) == {"mlp"}, f"channel_pattern={cfg.channel_pattern}")
    require(cfg.head_dim * cfg.num_heads == cfg.d_model, "head_dim must be d_model // num_heads")
    require(cfg.rnn_heads == cfg.num_heads, "the RG-LRU gates have num_heads blocks")
    require(cfg.mlp == "geglu" and cfg.mlp_bias and cfg.out_bias, "geglu MLP and o with biases")
    require(cfg.norm == "rms_plus_one" and cfg.tie_embeddings, "(1 + w) RMSNorm, tied head")
    require(not cfg.parallel_block and cfg.rope_scaling is None, "sequential blocks, plain RoPE")
    require(cfg.sliding_window_layers is None, "every attention layer is local")
    require(
        cfg.embed_scale == float(ml_dtypes.bfloat16(cfg.d_model**0.5)),
        f"embed_scale={cfg.embed_scale} (needs sqrt(d_model) in bfloat16)",
    )
    require(cfg.final_logit_softcap is not None, "logits are always soft-capped")
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": 2 * cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "lru_width": cfg.rnn_width,
        "attention_window_size": cfg.sliding_window,
        "conv1d_width": cfg.lru_conv_width,
        "logits_soft_cap": cfg.final_logit_softcap,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "block_types": [blocks[m] for m in cfg.mixer_pattern],
        "attention_bias": cfg.qkv_bias,
        "tie_word_embeddings": True,
        "embeddings_scale_by_sqrt_dim": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rope_fraction,
        },
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.rope_fraction,
        "max_position_embeddings": cfg.max_seq_len,
        "use_cache": True,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``config.json`` (already parsed into a dict).

    Raises:
      ConversionError: unsupported architecture, activation, RoPE type or layer type.
    """
    arch = architecture(hf)
    if arch == "Mamba2ForCausalLM":
        from models.hf import mamba2  # noqa: PLC0415 (it imports this module)

        return mamba2.config_from_hf(hf)
    if arch == "RecurrentGemmaForCausalLM":
        return _recurrent_gemma_from_hf(hf)
    defaults = _HF_DEFAULTS[arch]
    get = lambda key: hf.get(key, defaults.get(key))
    if get("hidden_act") not in ("silu", "swish"):
        raise ConversionError(f"unsupported hidden_act {get('hidden_act')!r}; supported: silu")
    num_heads = int(get("num_attention_heads"))
    num_layers = int(get("num_hidden_layers"))
    theta, scaling = _rope(hf, get)
    window, window_layers = _sliding(hf, arch, get, num_layers)
    if arch == "LlamaForCausalLM":
        qkv_bias = out_bias = bool(get("attention_bias"))
        mlp_bias = bool(get("mlp_bias"))
    elif arch == "Qwen2MoeForCausalLM":
        qkv_bias, out_bias, mlp_bias = bool(get("qkv_bias")), False, False
    else:
        qkv_bias, out_bias, mlp_bias = arch == "Qwen2ForCausalLM", False, False
    moe = _moe(hf, arch, get, num_layers) if arch in MOE_ARCHITECTURES else {}
    return ModelConfig(
        name=f"hf-{MODEL_TYPES[arch]}",
        vocab_size=int(get("vocab_size")),
        d_model=int(get("hidden_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("num_key_value_heads") or num_heads),
        head_dim=get("head_dim"),
        ffn_dim=int(get("intermediate_size")),
        mlp="swiglu",
        mlp_bias=mlp_bias,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        norm="rms",
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        sliding_window_layers=window_layers,
        max_seq_len=int(get("max_position_embeddings")),
        init_std=float(get("initializer_range")),
        hf_architecture=arch,
        source="Hugging Face config.json",
        **moe,
    )


def _infer_architecture(cfg: ModelConfig) -> str:
    if "mamba2" in cfg.mixer_pattern:
        return "Mamba2ForCausalLM"
    windows = {cfg.window(i) for i in range(cfg.num_layers)}
    if "moe" in cfg.channel_pattern:
        mixtral = set(cfg.channel_pattern) == {"moe"} and len(windows) == 1
        mixtral = mixtral and not (cfg.shared_ffn_dim or cfg.qkv_bias or cfg.out_bias)
        mixtral = mixtral and cfg.router_renormalize
        return "MixtralForCausalLM" if mixtral else "Qwen2MoeForCausalLM"
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return "Qwen2ForCausalLM"
    if windows == {None}:
        return "LlamaForCausalLM"
    return "MistralForCausalLM" if None not in windows else "Qwen2ForCausalLM"


def config_to_hf(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict that rebuilds ``cfg`` in transformers.

    The architecture is ``cfg.hf_architecture``, or inferred: with ``"moe"`` layers Mixtral
    (every layer MoE, no shared expert or biases, renormalised top-k, one window for all
    layers) else Qwen2-MoE; without, Qwen2 for q/k/v-only biases or a window on some layers,
    Mistral for a window on every layer, else Llama. Runtime choices (``moe_dispatch``,
    ``capacity_factor``, ``router_z_loss_coef``) have no Hugging Face field and are not saved.

    Raises:
      ConversionError: ``cfg`` uses a feature the architecture cannot express.
    """
    arch = cfg.hf_architecture or _infer_architecture(cfg)
    if arch == "Mamba2ForCausalLM":
        from models.hf import mamba2  # noqa: PLC0415 (it imports this module)

        return mamba2.config_to_hf(cfg)

    def require(ok: bool, why: str):
        if not ok:
            raise ConversionError(f"cannot save as {arch}: {why}")

    require(arch in MODEL_TYPES, f"unsupported; supported: {list(SUPPORTED_ARCHITECTURES)}")
    if arch == "RecurrentGemmaForCausalLM":
        return _recurrent_gemma_to_hf(cfg, require)
    require(set(cfg.mixer_pattern) == {"attention"}, f"mixer_pattern={cfg.mixer_pattern}")
    channels = tuple(cfg.channel(i) for i in range(cfg.num_layers))
    if arch == "MixtralForCausalLM":
        require(set(channels) == {"moe"}, f"every layer must be 'moe', got {cfg.channel_pattern}")
    elif arch == "Qwen2MoeForCausalLM":
        require(set(channels) <= {"moe", "mlp"}, f"channel_pattern={cfg.channel_pattern}")
    else:
        require(set(channels) == {"mlp"}, f"channel_pattern={cfg.channel_pattern}")
    require(cfg.mlp == "swiglu", f"mlp={cfg.mlp!r} (needs swiglu)")
    require(cfg.norm == "rms", f"norm={cfg.norm!r} (needs rms)")
    require(not cfg.parallel_block, "parallel_block=True")
    layers = tuple(i for i in range(cfg.num_layers) if cfg.window(i) is not None)
    if arch == "LlamaForCausalLM":
        require(cfg.qkv_bias == cfg.out_bias, "attention_bias covers q, k, v and o together")
        require(not layers, "no sliding window (use Mistral or Qwen2)")
    elif arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        require(not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), f"{arch} has no biases")
        require(len(layers) in (0, cfg.num_layers), "the window must cover every layer")
    elif arch == "Qwen2MoeForCausalLM":
        require(not cfg.out_bias and not cfg.mlp_bias, "Qwen2-MoE has no o or MLP biases")
    else:
        require(cfg.qkv_bias and not cfg.out_bias, "Qwen2 has q/k/v biases and no o bias")
        require(not cfg.mlp_bias, "Qwen2 has no MLP biases")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        legacy_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_len,
        }
        rope = {**legacy_scaling, "rope_theta": cfg.rope_theta}
    hf = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        # transformers >= 5 reads rope_parameters; the legacy keys serve transformers 4.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_scaling,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    if arch == "MixtralForCausalLM":
        require(not cfg.shared_ffn_dim, "Mixtral has no shared expert")
        require(cfg.router_renormalize, "Mixtral always renormalises the top-k weights")
    if arch == "Qwen2MoeForCausalLM" and "moe" in channels:
        require(cfg.shared_ffn_dim > 0, "Qwen2-MoE always has a shared expert (shared_ffn_dim)")
        require(cfg.shared_expert_gate, "Qwen2-MoE's shared expert is always gated")
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        hf.update(sliding_window=cfg.sliding_window if layers else None)
    elif arch == "MixtralForCausalLM":
        hf.update(
            intermediate_size=cfg.expert_ffn_dim,
            sliding_window=cfg.sliding_window if layers else None,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    else:
        suffix = bool(layers) and layers == tuple(range(layers[0], cfg.num_layers))
        hf.update(
            use_sliding_window=bool(layers),
            sliding_window=cfg.sliding_window if layers else None,
            max_window_layers=layers[0] if suffix else cfg.num_layers,
            layer_types=[
                "sliding_attention" if i in layers else "full_attention"
                for i in range(cfg.num_layers)
            ],
        )
    if arch == "Qwen2MoeForCausalLM":
        hf.update(
            qkv_bias=cfg.qkv_bias,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, c in enumerate(channels) if c == "mlp"],
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.expert_ffn_dim,
            shared_expert_intermediate_size=cfg.shared_ffn_dim,
            norm_topk_prob=cfg.router_renormalize,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
        )
    return hf


def dtype_name(dtype) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for a dtype-like, else an error."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; supported: {list(DTYPES)}")
    return name
