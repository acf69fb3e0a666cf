"""Model hyperparameters: one frozen dataclass for every family, and the named presets.

Families are configurations of one layer stack (``models.lm``): a block is a *mixer* (token
mixing: attention today; recurrent and linear-attention mixers register beside it) followed by
a *channel* block (an MLP today), chosen per layer by ``mixer_pattern`` / ``channel_pattern``.

Presets are named constructors with the published shapes and their source; ``get_config``
looks them up and applies overrides, ``list_configs`` lists them. Parameter counts of the real
presets are asserted exactly in ``tests/models/test_configs.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes

MLP_KINDS = ("swiglu", "geglu", "gelu")
NORM_KINDS = ("rms", "rms_plus_one", "layer")
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = (None, "int8")
MOE_DISPATCH = ("dropless", "capacity")
# ``naive``: models.ssm.naive_scan; the rest are kernels.scan.chunked_scan impls.
SSM_IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu", "naive")
# ``naive``: models.linear_attention.naive_recurrence; the rest: kernels.scan impls.
LINEAR_ATTN_IMPLS = SSM_IMPLS
LINEAR_ATTN_MIXERS = ("based", "gla", "retnet")
EXIT_HEADS = ("shared", "separate")
EXIT_LOSSES = ("weighted", "sorted")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (Llama 3 report, arXiv:2407.21783 §3.3).

    Wavelengths longer than ``original_max_len / low_freq_factor`` are divided by ``factor``,
    shorter than ``original_max_len / high_freq_factor`` are kept, and the band in between is
    interpolated linearly in ``original_max_len / wavelength``.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder language model. Hashable: usable as a jit static arg.

    Attributes:
      name: preset name (informational).
      vocab_size, d_model, num_layers, num_heads, num_kv_heads, ffn_dim: the usual shapes;
        ``num_heads % num_kv_heads == 0`` (MHA when equal, MQA when ``num_kv_heads == 1``).
      head_dim: per-head size; ``None`` means ``d_model // num_heads``.
      mlp: ``"swiglu"``, ``"geglu"`` (gated, three matrices) or ``"gelu"`` (two matrices).
      parallel_block: PaLM-style ``x + attn(norm(x)) + mlp(norm(x))`` with one norm per layer.
      norm: ``"rms"`` (RMSNorm), ``"rms_plus_one"`` (RMSNorm applying its stored scale ``w``
        as ``1 + w``: Gemma, RecurrentGemma) or ``"layer"`` (LayerNorm, scale only: PaLM has no
        biases).
      sliding_window: attention window ``w`` (a query at ``p`` sees keys in ``(p - w, p]``).
      sliding_window_layers: the layers that use the window; ``None`` means every layer.
      mixer_pattern / channel_pattern: names from the mixer / channel registries of
        ``models.lm``, repeated cyclically over the layers.
      param_dtype / dtype: storage dtype of the weights and compute dtype of activations.
      attention_impl: the ``impl`` passed to ``kernels.attention``.
      attention_interpret: run a Pallas ``attention_impl`` in interpret mode (CPU tests).
      num_experts: experts of each ``"moe"`` channel block (0: the model has none).
      experts_per_token: top-k experts each token is routed to.
      moe_ffn_dim: hidden size of one expert; ``None`` means ``ffn_dim``.
      shared_ffn_dim: hidden size of the always-active shared expert(s) (Qwen2-MoE,
        DeepSeekMoE); 0 for none. ``shared_expert_gate`` scales its output by a sigmoid gate.
      router_renormalize: renormalise the top-k router probabilities to sum to 1 (Mixtral)
        instead of keeping the softmax values (Qwen2-MoE's default).
      moe_dispatch: ``"dropless"`` (tokens sorted by expert, grouped matmul) or
        ``"capacity"`` (GShard/Switch buffers of ``capacity_factor * T * k / E`` slots per
        expert; overflowing tokens are dropped and counted).
      router_aux_loss_coef / router_z_loss_coef: weights of the load-balancing loss (Switch,
        arXiv:2101.03961 eq. 4) and the router z-loss (ST-MoE, arXiv:2202.08906 eq. 5).
      moe_impl / moe_interpret: ``impl`` and ``interpret`` of ``kernels.moe.grouped_matmul``.
      ssm_state_size, ssm_head_dim, ssm_groups, ssm_expand, ssm_conv_kernel: the
        ``"mamba2"`` mixer's shapes (``models.ssm``; Mamba-2's ``d_state``, ``headdim``,
        ``ngroups``, ``expand``, ``d_conv``): inner width ``I = ssm_expand * d_model``, split
        into ``ssm_heads`` heads of ``ssm_head_dim`` (``None``: ``I // ssm_head_dim``; must
        multiply back to ``I``), B/C shared by ``ssm_heads // ssm_groups`` heads each.
      ssm_chunk_size / ssm_impl / ssm_interpret: chunk length, ``impl`` and ``interpret`` of
        ``kernels.scan.chunked_scan``; ``ssm_impl="naive"`` runs ``models.ssm.naive_scan``
        (the per-step oracle) instead.
      ssm_time_step_limit: ``(lo, hi)`` clamp of ``dt`` after the softplus.
      ssm_conv_bias / ssm_bias: bias of the conv / of the in and out projections. The gated
        RMSNorm inside the mixer uses ``norm_eps``.
      linear_attn_heads, linear_attn_key_dim, linear_attn_value_dim: heads and per-head key /
        value sizes of the ``"based"``, ``"gla"`` and ``"retnet"`` mixers
        (``models.linear_attention``); ``None``: ``num_heads``, ``d_model // heads`` and
        ``d_model // heads`` (properties ``lin_heads``, ``lin_key_dim``, ``lin_value_dim``).
        Based's keys are its feature map of size ``1 + d' + d'^2`` instead.
      linear_attn_feature_dim: Based's ``d'``, the size of q/k before the Taylor feature map.
      gla_gate_rank: rank of GLA's low-rank decay gate ``W_a1 W_a2`` (16 in arXiv:2312.06635).
      linear_attn_chunk_size / linear_attn_impl / linear_attn_interpret: chunk length,
        ``impl`` and ``interpret`` of ``kernels.scan.chunked_scan`` for these mixers;
        ``"naive"`` runs the per-step recurrence (the oracle).
      rope_fraction: fraction of each head's dimensions that RoPE rotates (the first
        ``head_dim * rope_fraction``; the rest pass through): RecurrentGemma's
        ``partial_rotary_factor`` 0.5.
      embed_scale: multiplier of the token embeddings, applied in the compute dtype (Gemma's
        ``sqrt(d_model)``; RecurrentGemma's is that value rounded to bfloat16, as its HF
        ``normalizer`` buffer is). 1.0: none.
      final_logit_softcap: ``c`` maps the output logits to ``c * tanh(logits / c)`` (Gemma 2,
        RecurrentGemma's ``logits_soft_cap``); ``None``: no cap.
      lru_width: width of the ``"rglru"`` recurrent block (``models.griffin``, Griffin's RNN
        width, arXiv:2402.19427 §2.4); ``None`` means ``d_model``.
      lru_heads: blocks of the block-diagonal RG-LRU gate matrices (``lru_width`` divisible by
        it); ``None`` means ``num_heads``, as in RecurrentGemma.
      lru_conv_width: kernel width of the ``"rglru"`` block's causal depthwise convolution.
      kv_cache_dtype: ``None`` keeps the KV cache in ``dtype``; ``"int8"`` stores it as int8
        with one float32 scale per token and kv head (``models.state.KVCache``).
      exit_layers: early-exit depths (``models.early_exit``): an exit after the first ``d``
        blocks for each ``d``, strictly increasing in ``1..num_layers - 1``; ``()``: none.
      exit_head: ``"shared"`` (a per-exit norm, then the model's output head) or
        ``"separate"`` (a per-exit norm and output head).
      exit_loss: ``"weighted"`` (EE-LLM, arXiv:2312.04916: ``sum_i w_i CE_i``) or
        ``"sorted"`` (Sorted fine-tuning, arXiv:2309.08968: the ``w``-weighted mean over the
        nested sub-models ``sum_i w_i CE_i / sum_i w_i``).
      exit_loss_weights: one weight per exit, the final layer last (``len(exit_layers) + 1``);
        ``None``: all 1.0.
      hf_architecture: the Hugging Face class this config maps to, for ``models.hf``.
      source: where the published shape comes from.
    """

    name: str = "custom"
    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    ffn_dim: int = 256
    mlp: str = "swiglu"
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    parallel_block: bool = False
    norm: str = "rms"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None
    mixer_pattern: tuple[str, ...] = ("attention",)
    channel_pattern: tuple[str, ...] = ("mlp",)
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "auto"
    attention_interpret: bool = False
    kv_cache_dtype: str | None = None
    rope_fraction: float = 1.0
    embed_scale: float = 1.0
    final_logit_softcap: float | None = None
    lru_width: int | None = None
    lru_heads: int | None = None
    lru_conv_width: int = 4
    num_experts: int = 0
    experts_per_token: int = 2
    moe_ffn_dim: int | None = None
    shared_ffn_dim: int = 0
    shared_expert_gate: bool = False
    router_renormalize: bool = True
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    moe_impl: str = "auto"
    moe_interpret: bool = False
    ssm_state_size: int = 128
    ssm_heads: int | None = None
    ssm_head_dim: int = 64
    ssm_groups: int = 1
    ssm_expand: int = 2
    ssm_conv_kernel: int = 4
    ssm_chunk_size: int = 256
    ssm_impl: str = "auto"
    ssm_interpret: bool = False
    ssm_time_step_limit: tuple[float, float] = (0.0, float("inf"))
    ssm_conv_bias: bool = True
    ssm_bias: bool = False
    linear_attn_heads: int | None = None
    linear_attn_key_dim: int | None = None
    linear_attn_value_dim: int | None = None
    linear_attn_feature_dim: int = 16
    gla_gate_rank: int = 16
    linear_attn_chunk_size: int = 64
    linear_attn_impl: str = "auto"
    linear_attn_interpret: bool = False
    init_std: float = 0.02
    exit_layers: tuple[int, ...] = ()
    exit_head: str = "shared"
    exit_loss: str = "weighted"
    exit_loss_weights: tuple[float, ...] | None = None
    hf_architecture: str | None = None
    source: str = ""

    def __post_init__(self):
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}: every kv head must serve the same number of query heads"
            )
        _check_choice("mlp", self.mlp, MLP_KINDS)
        _check_choice("norm", self.norm, NORM_KINDS)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_window_layers is not None:
            bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"sliding_window_layers {bad} outside 0..{self.num_layers - 1}")
        if not self.mixer_pattern or not self.channel_pattern:
            raise ValueError("mixer_pattern and channel_pattern must be non-empty")
        self._check_griffin()
        _check_choice("moe_dispatch", self.moe_dispatch, MOE_DISPATCH)
        if "moe" in self.channel_pattern:
            if self.num_experts < 1:
                raise ValueError("channel_pattern has 'moe' blocks but num_experts is 0")
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"experts_per_token={self.experts_per_token} must be in "
                    f"1..num_experts={self.num_experts}"
                )
            if self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")
        self._check_ssm()
        self._check_linear_attention()
        self._check_exits()

    def _check_exits(self) -> None:
        object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
        _check_choice("exit_head", self.exit_head, EXIT_HEADS)
        _check_choice("exit_loss", self.exit_loss, EXIT_LOSSES)
        depths = self.exit_layers
        if any(not 1 <= d < self.num_layers for d in depths) or list(depths) != sorted(set(depths)):
            raise ValueError(
                f"exit_layers={depths} must be strictly increasing depths in "
                f"1..num_layers - 1 = {self.num_layers - 1}"
            )
        if self.exit_loss_weights is not None:
            weights = tuple(float(w) for w in self.exit_loss_weights)
            object.__setattr__(self, "exit_loss_weights", weights)
            if len(weights) != len(depths) + 1 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"exit_loss_weights={weights} needs len(exit_layers) + 1 = "
                    f"{len(depths) + 1} non-negative weights (the final layer last), not all 0"
                )

    def _check_linear_attention(self) -> None:
        _check_choice("linear_attn_impl", self.linear_attn_impl, LINEAR_ATTN_IMPLS)
        if not set(LINEAR_ATTN_MIXERS) & set(self.mixer_pattern):
            return
        for field in ("lin_heads", "lin_key_dim", "lin_value_dim", "linear_attn_feature_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.gla_gate_rank < 1 or self.linear_attn_chunk_size < 1:
            raise ValueError(
                f"gla_gate_rank={self.gla_gate_rank} and linear_attn_chunk_size="
                f"{self.linear_attn_chunk_size} must be positive"
            )
        if "retnet" in self.mixer_pattern and self.lin_key_dim % 2:
            raise ValueError(
                f"retnet rotates its keys: lin_key_dim={self.lin_key_dim} must be even"
            )

    def _check_ssm(self) -> None:
        if self.ssm_heads is None:
            heads = self.ssm_intermediate // max(self.ssm_head_dim, 1)
            object.__setattr__(self, "ssm_heads", heads)
        object.__setattr__(self, "ssm_time_step_limit", tuple(self.ssm_time_step_limit))
        _check_choice("ssm_impl", self.ssm_impl, SSM_IMPLS)
        if "mamba2" not in self.mixer_pattern:
            return
        for field in ("ssm_state_size", "ssm_heads", "ssm_head_dim", "ssm_groups", "ssm_expand"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.ssm_conv_kernel < 1 or self.ssm_chunk_size < 1:
            raise ValueError(
                f"ssm_conv_kernel={self.ssm_conv_kernel} and ssm_chunk_size="
                f"{self.ssm_chunk_size} must be positive"
            )
        if self.ssm_heads * self.ssm_head_dim != self.ssm_intermediate:
            raise ValueError(
                f"ssm_heads * ssm_head_dim = {self.ssm_heads} * {self.ssm_head_dim} must equal "
                f"ssm_expand * d_model = {self.ssm_intermediate}"
            )
        if self.ssm_heads % self.ssm_groups:
            raise ValueError(
                f"ssm_heads={self.ssm_heads} is not divisible by ssm_groups={self.ssm_groups}"
            )
        lo, hi = self.ssm_time_step_limit
        if not 0.0 <= lo <= hi:
            raise ValueError(f"ssm_time_step_limit={self.ssm_time_step_limit} needs 0 <= lo <= hi")

    @property
    def ssm_intermediate(self) -> int:
        """Inner width ``I = ssm_expand * d_model`` of a ``"mamba2"`` mixer."""
        return self.ssm_expand * self.d_model

    def _check_griffin(self) -> None:
        rotary = self.head_dim * self.rope_fraction
        if not 0.0 < self.rope_fraction <= 1.0 or rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(
                f"rope_fraction={self.rope_fraction} must be in (0, 1] and rotate an even "
                f"number of the head_dim={self.head_dim} dimensions"
            )
        if self.final_logit_softcap is not None and self.final_logit_softcap <= 0:
            raise ValueError(
                f"final_logit_softcap must be positive or None, got {self.final_logit_softcap}"
            )
        if "local_attention" in self.mixer_pattern and self.sliding_window is None:
            raise ValueError(
                "mixer_pattern has 'local_attention' blocks but sliding_window is None"
            )
        if "rglru" in self.mixer_pattern:
            if self.lru_conv_width < 1:
                raise ValueError(f"lru_conv_width must be positive, got {self.lru_conv_width}")
            if self.rnn_width < 1 or self.rnn_heads < 1 or self.rnn_width % self.rnn_heads:
                raise ValueError(
                    f"lru_width={self.rnn_width} must be a positive multiple of "
                    f"lru_heads={self.rnn_heads}"
                )

    @property
    def rnn_width(self) -> int:
        """Width of the ``"rglru"`` recurrent block (``lru_width`` or ``d_model``)."""
        return self.d_model if self.lru_width is None else self.lru_width

    @property
    def lin_heads(self) -> int:
        """Heads of a linear-attention mixer (``linear_attn_heads`` or ``num_heads``)."""
        return self.num_heads if self.linear_attn_heads is None else self.linear_attn_heads

    @property
    def lin_key_dim(self) -> int:
        """Per-head key size of ``"gla"`` / ``"retnet"`` (``linear_attn_key_dim`` or
        ``d_model // lin_heads``)."""
        k = self.linear_attn_key_dim
        return self.d_model // self.lin_heads if k is None else k

    @property
    def lin_value_dim(self) -> int:
        """Per-head value size of a linear-attention mixer (``linear_attn_value_dim`` or
        ``d_model // lin_heads``)."""
        v = self.linear_attn_value_dim
        return self.d_model // self.lin_heads if v is None else v

    @property
    def rnn_heads(self) -> int:
        """Blocks of the RG-LRU gate matrices (``lru_heads`` or ``num_heads``)."""
        return self.num_heads if self.lru_heads is None else self.lru_heads

    @property
    def expert_ffn_dim(self) -> int:
        """Hidden size of one routed expert."""
        return self.ffn_dim if self.moe_ffn_dim is None else self.moe_ffn_dim

    def mixer(self, layer: int) -> str:
        """Name of the mixer of ``layer``."""
        return self.mixer_pattern[layer % len(self.mixer_pattern)]

    def channel(self, layer: int) -> str:
        """Name of the channel block of ``layer``."""
        return self.channel_pattern[layer % len(self.channel_pattern)]

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer``'s attention, or ``None`` for global attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

    def replace(self, **overrides) -> ModelConfig:
        """A copy with fields replaced; unknown fields are an error listing the valid ones."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
        if "head_dim" not in overrides and ({"d_model", "num_heads"} & set(overrides)):
            overrides["head_dim"] = None  # re-derive unless given
        if "ssm_heads" not in overrides and (
            {"d_model", "ssm_expand", "ssm_head_dim"} & set(overrides)
        ):
            overrides["ssm_heads"] = None
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for key in (
            "sliding_window_layers",
            "mixer_pattern",
            "channel_pattern",
            "ssm_time_step_limit",
            "exit_layers",
            "exit_loss_weights",
        ):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def shortest_cycle(pattern: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest prefix that ``ModelConfig`` repeats cyclically into ``pattern``."""
    for n in range(1, len(pattern) + 1):
        if all(p == pattern[i % n] for i, p in enumerate(pattern)):
            return pattern[:n]
    return pattern


def _check_choice(field: str, value: str | None, valid: tuple[str | None, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {list(valid)}")


# --- presets -------------------------------------------------------------------------------

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def _preset(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    _PRESETS[fn().name] = fn
    return fn


def _llama2(name, d, layers, heads, kv_heads, ffn, source) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=32000,
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        ffn_dim=ffn,
        norm_eps=1e-5,
        max_seq_len=4096,
        hf_architecture="LlamaForCausalLM",
        source=source,
    )


@_preset
def dense_tiny() -> ModelConfig:
    """Tiny GQA Llama-style model for tests (byte vocabulary, 2 layers)."""
    return ModelConfig(
        name="dense-tiny",
        vocab_size=264,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=192,
        max_seq_len=512,
        hf_architecture="LlamaForCausalLM",
        source="Kestrel test shape",
    )


@_preset
def early_exit_tiny() -> ModelConfig:
    """``dense-tiny`` at 4 layers with exits after layers 1 and 2 (shared head, per-exit
    norms; EE-LLM-style weighted loss, arXiv:2312.04916)."""
    return dense_tiny().replace(
        name="early-exit-tiny", num_layers=4, exit_layers=(1, 2), hf_architecture=None
    )


@_preset
def dense_small() -> ModelConfig:
    """1.6M-parameter byte-level GQA model that `make demo` trains on a 2-core CPU in minutes."""
    return ModelConfig(
        name="dense-small",
        vocab_size=264,
        d_model=192,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        ffn_dim=512,
        tie_embeddings=True,
        max_seq_len=1024,
        hf_architecture="LlamaForCausalLM",
        source="Kestrel demo shape",
    )


@_preset
def dense_110m() -> ModelConfig:
    """GPT-2-small-sized Llama (12 x 768, 32k vocabulary, tied): the ~100M benchmark shape."""
    return ModelConfig(
        name="dense-110m",
        vocab_size=32000,
        d_model=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        ffn_dim=2048,
        tie_embeddings=True,
        max_seq_len=2048,
        hf_architecture="LlamaForCausalLM",
        source="GPT-2 small widths (Radford et al. 2019) in the Llama block",
    )


@_preset
def tinyllama_1_1b() -> ModelConfig:
    return ModelConfig(
        name="tinyllama-1.1b",
        vocab_size=32000,
        d_model=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        ffn_dim=5632,
        max_seq_len=2048,
        hf_architecture="LlamaForCausalLM",
        source="TinyLlama, arXiv:2401.02385 Table 1 (1,100,048,384 parameters)",
    )


@_preset
def llama_2_7b() -> ModelConfig:
    return _llama2("llama-2-7b", 4096, 32, 32, 32, 11008, "Table 1 of arXiv:2307.09288")


@_preset
def llama_2_13b() -> ModelConfig:
    return _llama2("llama-2-13b", 5120, 40, 40, 40, 13824, "Table 1 of arXiv:2307.09288")


@_preset
def llama_2_70b() -> ModelConfig:
    return _llama2("llama-2-70b", 8192, 80, 64, 8, 28672, "Table 1 of arXiv:2307.09288 (GQA)")


def _llama3(name, d, layers, heads, ffn, scaling, source) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=128256,
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        ffn_dim=ffn,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_seq_len=131072 if scaling else 8192,
        hf_architecture="LlamaForCausalLM",
        source=source,
    )


@_preset
def llama_3_8b() -> ModelConfig:
    return _llama3("llama-3-8b", 4096, 32, 32, 14336, None, "Table 3 of arXiv:2407.21783")


@_preset
def llama_3_70b() -> ModelConfig:
    return _llama3("llama-3-70b", 8192, 80, 64, 28672, None, "Table 3 of arXiv:2407.21783")


@_preset
def llama_3_1_8b() -> ModelConfig:
    return _llama3(
        "llama-3.1-8b", 4096, 32, 32, 14336, RopeScaling(), "Table 3 and §3.3 of arXiv:2407.21783"
    )


@_preset
def mistral_7b() -> ModelConfig:
    return ModelConfig(
        name="mistral-7b",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=14336,
        sliding_window=4096,
        max_seq_len=32768,
        hf_architecture="MistralForCausalLM",
        source="Table 1 of arXiv:2310.06825 (v0.1: window 4096, theta 1e4)",
    )


def _palm(name, d, layers, heads, source) -> ModelConfig:
    # PaLM (arXiv:2204.02311 §2): SwiGLU with ffn = 4 d, parallel blocks, multi-query attention
    # with head size 256, RoPE, shared input/output embeddings, no biases, 256k SentencePiece.
    return ModelConfig(
        name=name,
        vocab_size=256000,
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=1,
        head_dim=256,
        ffn_dim=4 * d,
        parallel_block=True,
        norm="layer",
        norm_eps=1e-6,
        tie_embeddings=True,
        max_seq_len=2048,
        source=source,
    )


@_preset
def palm_8b() -> ModelConfig:
    return _palm("palm-8b", 4096, 32, 16, "Table 1 of arXiv:2204.02311 (8.63B)")


@_preset
def palm_62b() -> ModelConfig:
    return _palm("palm-62b", 8192, 64, 32, "Table 1 of arXiv:2204.02311 (62.50B)")


@_preset
def palm_540b() -> ModelConfig:
    return _palm("palm-540b", 18432, 118, 48, "Table 1 of arXiv:2204.02311 (540.35B)")


@_preset
def moe_tiny() -> ModelConfig:
    """Tiny Mixtral-style MoE for tests and CPU training: 4 experts, top-2, byte vocabulary."""
    return dense_tiny().replace(
        name="moe-tiny",
        channel_pattern=("moe",),
        num_experts=4,
        experts_per_token=2,
        moe_ffn_dim=96,
        hf_architecture="MixtralForCausalLM",
        source="Kestrel test shape",
    )


@_preset
def mixtral_8x7b() -> ModelConfig:
    return ModelConfig(
        name="mixtral-8x7b",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=14336,
        channel_pattern=("moe",),
        num_experts=8,
        experts_per_token=2,
        router_aux_loss_coef=0.02,
        norm_eps=1e-5,
        rope_theta=1e6,
        max_seq_len=32768,
        hf_architecture="MixtralForCausalLM",
        source="arXiv:2401.04088 §2 and mistralai/Mixtral-8x7B-v0.1 config.json",
    )


@_preset
def qwen1_5_moe_a2_7b() -> ModelConfig:
    # Every layer is sparse (decoder_sparse_step 1, no mlp_only_layers); ffn_dim is the
    # config's dense intermediate_size, used by no layer.
    return ModelConfig(
        name="qwen1.5-moe-a2.7b",
        vocab_size=151936,
        d_model=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        ffn_dim=5632,
        qkv_bias=True,
        channel_pattern=("moe",),
        num_experts=60,
        experts_per_token=4,
        moe_ffn_dim=1408,
        shared_ffn_dim=5632,
        shared_expert_gate=True,
        router_renormalize=False,
        router_aux_loss_coef=0.001,
        norm_eps=1e-6,
        rope_theta=1e6,
        max_seq_len=8192,
        hf_architecture="Qwen2MoeForCausalLM",
        source="Qwen/Qwen1.5-MoE-A2.7B config.json (14.3B total, 2.7B activated per its card)",
    )


def _griffin(name, vocab, d, layers, heads, kv_heads, head_dim, ffn, window, source, **kw):
    # RecurrentGemma (arXiv:2404.07839 §2, HF modeling_recurrent_gemma): residual blocks of
    # two RG-LRU recurrent blocks then one local MQA block, gated GELU MLPs with biases whose
    # width is half of HF's intermediate_size, (1 + w) RMSNorms, embeddings scaled by
    # sqrt(d_model) rounded to bfloat16, half-rotary RoPE, tied output head soft-capped at 30.
    return ModelConfig(
        name=name,
        vocab_size=vocab,
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn,
        mlp="geglu",
        mlp_bias=True,
        out_bias=True,
        norm="rms_plus_one",
        norm_eps=1e-6,
        tie_embeddings=True,
        rope_fraction=0.5,
        sliding_window=window,
        mixer_pattern=("rglru", "rglru", "local_attention"),
        embed_scale=float(ml_dtypes.bfloat16(d**0.5)),
        final_logit_softcap=30.0,
        lru_width=d,
        lru_conv_width=4,
        hf_architecture="RecurrentGemmaForCausalLM",
        source=source,
        **kw,
    )


@_preset
def griffin_tiny() -> ModelConfig:
    """Tiny Griffin (RecurrentGemma-shaped) model for tests: window 8, byte vocabulary."""
    return _griffin(
        "griffin-tiny", 264, 64, 3, 4, 1, 16, 128, 8, "Kestrel test shape", max_seq_len=512
    )


@_preset
def recurrentgemma_2b() -> ModelConfig:
    return _griffin(
        "recurrentgemma-2b",
        256000,
        2560,
        26,
        10,
        1,
        256,
        15360 // 2,
        2048,
        "google/recurrentgemma-2b config.json (intermediate_size 15360, halved by HF's "
        "RecurrentGemmaMlp) and arXiv:2404.07839 Table 1 (2.7B parameters)",
        max_seq_len=8192,
    )


def _mamba2(name, d, layers, vocab, source, **extra) -> ModelConfig:
    # A Mamba-2 LM: every block is norm -> Mamba-2 mixer -> residual, no MLP
    # (mamba_ssm's MambaLMHeadModel with ssm_cfg layer "Mamba2", d_intermediate 0).
    return ModelConfig(
        name=name,
        vocab_size=vocab,
        d_model=d,
        num_layers=layers,
        mixer_pattern=("mamba2",),
        channel_pattern=("none",),
        tie_embeddings=True,
        hf_architecture="Mamba2ForCausalLM",
        source=source,
        **extra,
    )


@_preset
def mamba2_tiny() -> ModelConfig:
    """Tiny Mamba-2 for tests: 8 heads of 16 in 2 B/C groups, state 16, byte vocabulary."""
    return _mamba2(
        "mamba2-tiny",
        64,
        2,
        264,
        "Kestrel test shape",
        ssm_state_size=16,
        ssm_head_dim=16,
        ssm_groups=2,
        ssm_chunk_size=32,
        max_seq_len=512,
    )


@_preset
def mamba2_2_7b() -> ModelConfig:
    # mamba_ssm pads the vocabulary to a multiple of pad_vocab_size_multiple=16: 50277 -> 50288.
    return _mamba2(
        "mamba2-2.7b",
        2560,
        64,
        50288,
        "state-spaces/mamba2-2.7b config.json (d_model 2560, n_layer 64, vocab 50277 padded to "
        "a multiple of 16, tied) with mamba_ssm's Mamba2 defaults (d_state 128, headdim 64, "
        "expand 2, ngroups 1, d_conv 4, chunk 256); arXiv:2405.21060 §9",
        ssm_state_size=128,
        ssm_head_dim=64,
        ssm_groups=1,
        ssm_chunk_size=256,
        max_seq_len=1 << 20,
    )


@_preset
def mamba2_hybrid_tiny() -> ModelConfig:
    """Jamba/Zamba-style hybrid for tests: two Mamba-2 layers then one attention, MLP channels."""
    return dense_tiny().replace(
        name="mamba2-hybrid-tiny",
        num_layers=3,
        mixer_pattern=("mamba2", "mamba2", "attention"),
        ssm_state_size=16,
        ssm_head_dim=16,
        ssm_groups=2,
        ssm_chunk_size=32,
        hf_architecture=None,
        source="Kestrel test shape",
    )


def _linear_attention(name, mixers, source, **extra) -> ModelConfig:
    # A byte-level test shape: 4 heads over d_model 64, SwiGLU MLP channels, chunk 16.
    return dense_tiny().replace(
        name=name,
        mixer_pattern=mixers,
        ffn_dim=128,
        linear_attn_heads=4,
        linear_attn_chunk_size=16,
        hf_architecture=None,
        source=source,
        **extra,
    )


@_preset
def based_tiny() -> ModelConfig:
    """Tiny Based (arXiv:2402.18668 §4): Taylor linear attention (d' = 8) alternating with
    sliding-window (8) softmax attention, 4 layers."""
    return _linear_attention(
        "based-tiny",
        ("based", "local_attention"),
        "Kestrel test shape (Based, arXiv:2402.18668)",
        num_layers=4,
        sliding_window=8,
        linear_attn_feature_dim=8,
    )


@_preset
def gla_tiny() -> ModelConfig:
    """Tiny GLA (arXiv:2312.06635 §4.4 shapes: d_k = d / 2, d_v = d, gate rank 16)."""
    return _linear_attention(
        "gla-tiny",
        ("gla",),
        "Kestrel test shape (GLA, arXiv:2312.06635)",
        linear_attn_key_dim=8,
        linear_attn_value_dim=16,
        gla_gate_rank=16,
    )


@_preset
def retnet_tiny() -> ModelConfig:
    """Tiny RetNet (arXiv:2307.08621 §2 and §3.1: d_k = d, d_v = 2d, FFN 2d with GELU,
    pre-LayerNorm)."""
    return _linear_attention(
        "retnet-tiny",
        ("retnet",),
        "Kestrel test shape (RetNet, arXiv:2307.08621)",
        linear_attn_key_dim=16,
        linear_attn_value_dim=32,
        mlp="gelu",
        norm="layer",
    )


def list_configs() -> list[str]:
    """Names of every preset, sorted."""
    return sorted(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied.

    Raises:
      ValueError: unknown preset (the message lists the valid names) or unknown field.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(list_configs())}")
    cfg = _PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
