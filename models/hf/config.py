"""``config.json`` of Hugging Face Llama / Mistral / Qwen2 <-> ``ModelConfig``.

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
  iff ``i >= max_window_layers`` (``Qwen2Config.__post_init__``).
"""

from __future__ import annotations

import jax.numpy as jnp

from models.configs import DTYPES, ModelConfig, RopeScaling

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
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
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
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
    if arch == "MistralForCausalLM":
        return get("sliding_window"), None
    window = get("sliding_window") if get("use_sliding_window") else None
    layer_types = get("layer_types")
    if layer_types is None:
        m = get("max_window_layers")
        layer_types = [
            "sliding_attention" if window is not None and i >= m else "full_attention"
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


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``config.json`` (already parsed into a dict).

    Raises:
      ConversionError: unsupported architecture, activation, RoPE type or layer type.
    """
    arch = architecture(hf)
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
    else:
        qkv_bias, out_bias, mlp_bias = arch == "Qwen2ForCausalLM", False, False
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
    )


def _infer_architecture(cfg: ModelConfig) -> str:
    windows = {cfg.window(i) for i in range(cfg.num_layers)}
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return "Qwen2ForCausalLM"
    if windows == {None}:
        return "LlamaForCausalLM"
    return "MistralForCausalLM" if None not in windows else "Qwen2ForCausalLM"


def config_to_hf(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict that rebuilds ``cfg`` in transformers.

    The architecture is ``cfg.hf_architecture``, or inferred (Qwen2 for q/k/v-only biases or a
    window on some layers, Mistral for a window on every layer, else Llama).

    Raises:
      ConversionError: ``cfg`` uses a feature the architecture cannot express.
    """
    arch = cfg.hf_architecture or _infer_architecture(cfg)

    def require(ok: bool, why: str):
        if not ok:
            raise ConversionError(f"cannot save as {arch}: {why}")

    require(arch in MODEL_TYPES, f"unsupported; supported: {list(SUPPORTED_ARCHITECTURES)}")
    require(set(cfg.mixer_pattern) == {"attention"}, f"mixer_pattern={cfg.mixer_pattern}")
    require(set(cfg.channel_pattern) == {"mlp"}, f"channel_pattern={cfg.channel_pattern}")
    require(cfg.mlp == "swiglu", f"mlp={cfg.mlp!r} (needs swiglu)")
    require(cfg.norm == "rms", f"norm={cfg.norm!r} (needs rms)")
    require(not cfg.parallel_block, "parallel_block=True")
    layers = tuple(i for i in range(cfg.num_layers) if cfg.window(i) is not None)
    if arch == "LlamaForCausalLM":
        require(cfg.qkv_bias == cfg.out_bias, "attention_bias covers q, k, v and o together")
        require(not layers, "no sliding window (use Mistral or Qwen2)")
    elif arch == "MistralForCausalLM":
        require(not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), "Mistral has no biases")
        require(len(layers) in (0, cfg.num_layers), "the window must cover every layer")
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
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        hf.update(sliding_window=cfg.sliding_window if layers else None)
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
