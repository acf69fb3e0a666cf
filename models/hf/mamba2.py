"""Hugging Face ``Mamba2ForCausalLM`` <-> ``models.LM`` with ``"mamba2"`` mixers and no MLPs.

Semantics of transformers 5.24's ``configuration_mamba2.py`` / ``modeling_mamba2.py``:

* ``Mamba2Block`` is ``x + mixer(RMSNorm(x))`` (``channel_pattern=("none",)``), then
  ``norm_f``; every RMSNorm, the gated one inside the mixer included, uses
  ``layer_norm_epsilon`` (our ``norm_eps``).
* ``in_proj`` ``[2I + 2GN + H, D]`` splits as ``[z, x, B, C, dt]``; ``conv1d`` is depthwise
  over ``(x, B, C)`` with weight ``[C, 1, W]`` (our ``conv_weight`` ``[W, C]``);
  ``dt_bias``, ``A_log``, ``D`` are per head; ``norm.weight`` is the gated RMSNorm's
  (``group_size = I / n_groups``); ``intermediate = expand * hidden = num_heads * head_dim``.
* ``residual_in_fp32`` keeps transformers' residual in float32; ours stays in the compute
  dtype (identical in float32). ``time_step_min/max/floor``, ``time_step_rank``,
  ``initializer_range`` and ``rescale_prenorm_residual`` only affect initialisation.
"""

from __future__ import annotations

from models.configs import ModelConfig
from models.hf.config import ConversionError

ARCHITECTURE = "Mamba2ForCausalLM"
MODEL_TYPE = "mamba2"
# Mamba-2 has no position embedding: no length limit of its own.
MAX_SEQ_LEN = 1 << 20

# Class defaults of transformers 5.24's Mamba2Config for the keys read here.
HF_DEFAULTS = dict(
    num_heads=128,
    head_dim=64,
    vocab_size=32768,
    hidden_size=4096,
    state_size=128,
    num_hidden_layers=64,
    layer_norm_epsilon=1e-5,
    expand=2,
    conv_kernel=4,
    n_groups=8,
    use_bias=False,
    use_conv_bias=True,
    hidden_act="silu",
    initializer_range=0.1,
    time_step_limit=(0.0, float("inf")),
    chunk_size=256,
    tie_word_embeddings=False,
)


def _float(x) -> float:
    """A float, also from transformers 5's JSON spelling of infinities
    (``{"__float__": "Infinity"}``)."""
    return float(x["__float__"] if isinstance(x, dict) and "__float__" in x else x)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a ``Mamba2ForCausalLM`` ``config.json`` dict."""
    get = lambda key: hf.get(key, HF_DEFAULTS[key])
    if get("hidden_act") not in ("silu", "swish"):
        raise ConversionError(f"unsupported hidden_act {get('hidden_act')!r}; supported: silu")
    limit = get("time_step_limit")
    if limit is None or len(limit) != 2:
        raise ConversionError(f"time_step_limit must be a pair (lo, hi), got {limit!r}")
    limit = [_float(x) for x in limit]
    hidden, expand = int(get("hidden_size")), int(get("expand"))
    heads, head_dim = int(get("num_heads")), int(get("head_dim"))
    if hidden * expand != heads * head_dim:
        raise ConversionError(
            f"hidden_size * expand = {hidden * expand} must equal num_heads * head_dim = "
            f"{heads * head_dim}"
        )
    try:
        return ModelConfig(
            name=f"hf-{MODEL_TYPE}",
            vocab_size=int(get("vocab_size")),
            d_model=hidden,
            num_layers=int(get("num_hidden_layers")),
            mixer_pattern=("mamba2",),
            channel_pattern=("none",),
            norm="rms",
            norm_eps=float(get("layer_norm_epsilon")),
            tie_embeddings=bool(get("tie_word_embeddings")),
            ssm_state_size=int(get("state_size")),
            ssm_heads=heads,
            ssm_head_dim=head_dim,
            ssm_groups=int(get("n_groups")),
            ssm_expand=expand,
            ssm_conv_kernel=int(get("conv_kernel")),
            ssm_chunk_size=int(get("chunk_size")),
            ssm_time_step_limit=tuple(limit),
            ssm_conv_bias=bool(get("use_conv_bias")),
            ssm_bias=bool(get("use_bias")),
            max_seq_len=MAX_SEQ_LEN,
            init_std=float(get("initializer_range")),
            hf_architecture=ARCHITECTURE,
            source="Hugging Face config.json",
        )
    except ValueError as e:
        raise ConversionError(f"inconsistent Mamba2 config.json: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``Mamba2Config`` dict of ``cfg``; an error if ``cfg`` is not a pure Mamba-2 LM."""

    def require(ok: bool, why: str):
        if not ok:
            raise ConversionError(f"cannot save as {ARCHITECTURE}: {why}")

    require(cfg.mixer_pattern == ("mamba2",), f"mixer_pattern={cfg.mixer_pattern}")
    require(cfg.channel_pattern == ("none",), f"channel_pattern={cfg.channel_pattern}")
    require(cfg.norm == "rms", f"norm={cfg.norm!r} (needs rms)")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_heads": cfg.ssm_heads,
        "head_dim": cfg.ssm_head_dim,
        "expand": cfg.ssm_expand,
        "n_groups": cfg.ssm_groups,
        "state_size": cfg.ssm_state_size,
        "conv_kernel": cfg.ssm_conv_kernel,
        "chunk_size": cfg.ssm_chunk_size,
        "use_conv_bias": cfg.ssm_conv_bias,
        "use_bias": cfg.ssm_bias,
        "time_step_limit": list(cfg.ssm_time_step_limit),
        "layer_norm_epsilon": cfg.norm_eps,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }


def tensor_names(cfg: ModelConfig) -> list[tuple]:
    """``(hf_name, our path, kind)`` of every tensor (kinds of ``models.hf.convert._Tensor``)."""
    specs = [("backbone.embeddings.weight", ("embed", "embedding"), "same")]
    for i in range(cfg.num_layers):
        hf, ours = f"backbone.layers.{i}.", ("blocks", i)
        mixer, path = hf + "mixer.", (*ours, "mixer")
        specs += [
            (hf + "norm.weight", (*ours, "mixer_norm", "scale"), "same"),
            (mixer + "in_proj.weight", (*path, "in_proj", "kernel"), "linear"),
            (mixer + "conv1d.weight", (*path, "conv_weight"), "conv"),
            (mixer + "dt_bias", (*path, "dt_bias"), "same"),
            (mixer + "A_log", (*path, "A_log"), "same"),
            (mixer + "D", (*path, "D"), "same"),
            (mixer + "norm.weight", (*path, "norm_scale"), "same"),
            (mixer + "out_proj.weight", (*path, "out_proj", "kernel"), "linear"),
        ]
        if cfg.ssm_conv_bias:
            specs.append((mixer + "conv1d.bias", (*path, "conv_bias"), "same"))
        if cfg.ssm_bias:
            specs.append((mixer + "in_proj.bias", (*path, "in_proj", "bias"), "same"))
            specs.append((mixer + "out_proj.bias", (*path, "out_proj", "bias"), "same"))
    specs.append(("backbone.norm_f.weight", ("final_norm", "scale"), "same"))
    if not cfg.tie_embeddings:
        specs.append(("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return specs
