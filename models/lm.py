"""The decoder language model: one layer stack for every family.

A block is ``norm -> mixer -> residual -> norm -> channel -> residual`` (or PaLM's parallel
form ``x + mixer(norm(x)) + channel(norm(x))``). Mixers and channel blocks are looked up by
name in ``MIXERS`` / ``CHANNELS``; a new family registers its blocks with ``register_mixer`` /
``register_channel`` and names them in ``ModelConfig.mixer_pattern`` / ``channel_pattern``.

Mixer contract (see ``models.state``): ``cls(cfg, layer, *, rngs)``; ``init_state(batch,
max_len)`` returns the layer's decode state; ``__call__(x_BTD, segment, state)`` returns
``(y_BTD, new_state)`` with ``state=None`` for a stateless forward. Channel contract:
``cls(cfg, layer, *, rngs)`` and ``__call__(x_BTD) -> y_BTD``, or ``-> (y_BTD, aux)`` with
``aux`` a dict of float32 statistics (the ``"moe"`` block's router losses). A model with such
channels returns an ``LMOutput`` from ``model(tokens)`` instead of the bare logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import early_exit
from models.attention import Attention
from models.configs import ModelConfig
from models.griffin import LocalAttention, RGLRUBlock
from models.layers import Einsum, Embed, make_norm
from models.layers.linear import shapes_only
from models.linear_attention import GLA, Based, RetNet
from models.mlp import MLP
from models.moe import MoE, combine_aux
from models.ssm import Mamba2
from models.state import DecodeState, Segment
from partitioning.rules import shard_as

_RESIDUAL = ("act_batch", "act_seq", "act_embed")
_INPUT = ("act_batch", "act_seq", "act_hidden")

MIXERS: dict[str, type] = {"attention": Attention, "mamba2": Mamba2}
CHANNELS: dict[str, type | None] = {"mlp": MLP, "moe": MoE, "none": None}
MIXERS.update(rglru=RGLRUBlock, local_attention=LocalAttention)
MIXERS.update(based=Based, gla=GLA, retnet=RetNet)


def register_mixer(name: str, cls: type) -> None:
    """Make ``cls`` available as ``ModelConfig.mixer_pattern`` entry ``name``."""
    MIXERS[name] = cls


def register_channel(name: str, cls: type | None) -> None:
    """Make ``cls`` available as ``ModelConfig.channel_pattern`` entry ``name``."""
    CHANNELS[name] = cls


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; registered: {sorted(table)}")
    return table[name]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.parallel = cfg.parallel_block
        self.mixer_norm = make_norm(cfg.norm, cfg.d_model, **norm)
        self.mixer = _lookup(MIXERS, cfg.mixer(layer), "mixer")(cfg, layer, rngs=rngs)
        channel_cls = _lookup(CHANNELS, cfg.channel(layer), "channel block")
        self.channel = None if channel_cls is None else channel_cls(cfg, layer, rngs=rngs)
        separate_norm = channel_cls is not None and not self.parallel
        self.channel_norm = make_norm(cfg.norm, cfg.d_model, **norm) if separate_norm else None

    def init_state(self, batch: int, max_len: int):
        return self.mixer.init_state(batch, max_len)

    def _channel(self, h_BTD):
        out = self.channel(h_BTD)
        return out if isinstance(out, tuple) else (out, None)

    def __call__(self, x_BTD, segment: Segment, state=None):
        """``(x_BTD, new_state, aux)``; ``aux`` is the channel's dict or ``None``."""
        h_BTD = shard_as(self.mixer_norm(x_BTD), _INPUT)
        y_BTD, state = self.mixer(h_BTD, segment, state)
        if self.channel is None:
            return shard_as(x_BTD + y_BTD, _RESIDUAL), state, None
        if self.parallel:
            c_BTD, aux = self._channel(h_BTD)
            return shard_as(x_BTD + y_BTD + c_BTD, _RESIDUAL), state, aux
        x_BTD = shard_as(x_BTD + y_BTD, _RESIDUAL)
        c_BTD, aux = self._channel(shard_as(self.channel_norm(x_BTD), _INPUT))
        return shard_as(x_BTD + c_BTD, _RESIDUAL), state, aux


@struct.dataclass
class LMOutput:
    """``model(tokens)`` of a model with mixture-of-experts layers (a pytree).

    Attributes:
      logits: float32 ``[B, T, V]``.
      aux_loss: float32 scalar to add to the training loss (``models.moe.combine_aux``:
        ``router_aux_loss_coef`` times the load-balancing loss pooled over layers as in
        ``transformers``, plus ``router_z_loss_coef`` times the layer-mean z-loss).
      router_stats: pooled ``load_balance_loss``, ``z_loss``, ``dropped_fraction`` and the
        per-layer statistics ``layer_*`` stacked over the MoE layers.
    """

    logits: jax.Array
    aux_loss: jax.Array
    router_stats: dict


class LM(nnx.Module):
    """Decoder-only language model.

    ``model(tokens_BT)`` is the stateless causal forward (positions ``0..T-1``) returning
    float32 logits ``[B, T, V]``. ``init_state`` / ``step`` run it incrementally.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, std=cfg.init_std, param_dtype=pdt, dtype=dt, rngs=rngs
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = make_norm(
            cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs
        )
        self.lm_head = None if cfg.tie_embeddings else output_head(cfg, rngs=rngs)
        self.exits = early_exit.ExitHeads(cfg, output_head, rngs=rngs) if cfg.exit_layers else None

    def __call__(self, tokens_BT):
        """Logits ``[B, T, V]``, or an ``LMOutput`` if some channel block reports aux losses,
        or an ``early_exit.EarlyExitOutput`` if the config has ``exit_layers``."""
        if self.exits is not None:
            return early_exit.forward(self, tokens_BT)
        logits_BTV, _, auxes = self._forward(tokens_BT, None)
        auxes = [a for a in auxes if a is not None]
        if not auxes:
            return logits_BTV
        return LMOutput(logits_BTV, *combine_aux(auxes, self.config))

    def init_state(self, batch: int, max_len: int) -> DecodeState:
        """An empty decode state for ``batch`` sequences of up to ``max_len`` tokens."""
        return DecodeState(
            lengths_B=jnp.zeros((batch,), jnp.int32),
            layers=tuple(block.init_state(batch, max_len) for block in self.blocks),
        )

    def step(
        self, tokens_BT, state: DecodeState | None, *, num_new_B=None, fresh=False, last_only=False
    ):
        """Append ``tokens_BT`` to ``state`` and return their logits and the new state.

        Args:
          tokens_BT: int32 tokens; row ``b`` holds ``num_new_B[b]`` real tokens, then padding.
          state: from ``init_state`` (or a previous step); ``None`` for a stateless forward.
          num_new_B: real tokens per row, default ``T``.
          fresh: static promise that ``state`` is empty (prefill); lets attention skip the
            cache read.
          last_only: return logits only at each row's last real token, ``[B, 1, V]``.

        Returns:
          ``(logits, state)``: float32 logits ``[B, T, V]`` (or ``[B, 1, V]``) and the state.
        """
        logits, state, _ = self._forward(
            tokens_BT, state, num_new_B=num_new_B, fresh=fresh, last_only=last_only
        )
        return logits, state

    def _forward(self, tokens_BT, state, *, num_new_B=None, fresh=False, last_only=False):
        """``step`` that also returns each layer's channel ``aux`` (``None`` for most)."""
        B, T = tokens_BT.shape
        if num_new_B is None:
            num_new_B = jnp.full((B,), T, jnp.int32)
        if state is None:
            segment = Segment(jnp.zeros((B,), jnp.int32), num_new_B.astype(jnp.int32), T, True)
        else:
            starts_B = state.lengths_B
            segment = Segment(starts_B, starts_B + num_new_B, T, fresh)
        x_BTD = self.embed_tokens(tokens_BT)
        layer_states, auxes = [], []
        for i, block in enumerate(self.blocks):
            x_BTD, layer_state, aux = block(
                x_BTD, segment, None if state is None else state.layers[i]
            )
            layer_states.append(layer_state)
            auxes.append(aux)
        if last_only:
            last_B = jnp.maximum(num_new_B - 1, 0)
            x_BTD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
        logits_BTV = self.head(x_BTD)
        if state is not None:
            state = state.replace(lengths_B=segment.lengths_B, layers=tuple(layer_states))
        return logits_BTV, state, auxes

    def embed_tokens(self, tokens_BT):
        """The residual stream's input: scaled token embeddings ``[B, T, D]``."""
        x_BTD = self.embed(tokens_BT)
        if self.config.embed_scale != 1.0:
            x_BTD = x_BTD * jnp.asarray(self.config.embed_scale, x_BTD.dtype)
        return shard_as(x_BTD, _RESIDUAL)

    def head(self, x_BTD):
        """Final norm and output head of the residual stream: float32 logits."""
        return self.logits(shard_as(self.final_norm(x_BTD), _INPUT))

    def logits(self, x_BTD, head=None):
        """Output head (tied or not; ``head``, e.g. an exit's own, replaces it), float32,
        soft-capped if ``final_logit_softcap`` is set."""
        head = self.lm_head if head is None else head
        logits_BTV = self.embed.attend(x_BTD) if head is None else head(x_BTD)
        cap = self.config.final_logit_softcap
        return logits_BTV if cap is None else cap * jnp.tanh(logits_BTV / cap)


def output_head(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Einsum:
    """An untied ``[D, V]`` output head with float32 logits (the LM's, or an exit's own)."""
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    return Einsum(
        "BTD,DV->BTV",
        (cfg.d_model, cfg.vocab_size),
        ("embed", "vocab"),
        std=cfg.init_std,
        param_dtype=pdt,
        dtype=dt,
        out_dtype=jnp.float32,
        rngs=rngs,
    )


def build(config: ModelConfig, *, seed: int = 0) -> LM:
    """A randomly initialised language model for ``config``."""
    return LM(config, rngs=nnx.Rngs(seed))


def abstract(config: ModelConfig) -> LM:
    """The model with ``jax.ShapeDtypeStruct`` parameters (no memory, no tracing)."""
    with shapes_only():
        return LM(config, rngs=nnx.Rngs(0))


def count_params(model_or_config) -> int:
    """Number of parameters of a model (or of the model a config describes)."""
    model = (
        abstract(model_or_config) if isinstance(model_or_config, ModelConfig) else (model_or_config)
    )
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_active_params(model_or_config) -> int:
    """Parameters one token uses: ``count_params`` less the routed experts it is not sent to.

    Embedding, attention, norms, routers, the ``experts_per_token`` chosen experts, shared
    experts and the output head all count (the convention of Mixtral's "13B active" and
    Qwen1.5-MoE's "2.7B activated"); each MoE layer drops ``(E - k) / E`` of its routed
    expert weights. Equals ``count_params`` for dense models.
    """
    model = (
        abstract(model_or_config) if isinstance(model_or_config, ModelConfig) else (model_or_config)
    )
    cfg = model.config
    inactive = 0
    for block in model.blocks:
        if isinstance(block.channel, MoE):
            matrices = 2 if block.channel.gate is None else 3
            per_expert = matrices * cfg.d_model * cfg.expert_ffn_dim
            inactive += (cfg.num_experts - cfg.experts_per_token) * per_expert
    return count_params(model) - inactive
