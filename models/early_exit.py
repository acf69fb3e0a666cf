"""Early-exit language models: exit heads, the multi-exit loss, and decoding that stops early.

An early-exit model is an ``LM`` whose config names ``exit_layers``: depths ``d`` (after the
first ``d`` blocks) where an extra head reads the residual stream. ``model(tokens)`` then
returns an ``EarlyExitOutput`` with every exit's logits beside the final ones.

Training (``exit_loss``): a weighted sum of the exits' cross entropies as in EE-LLM
(Chen et al., arXiv:2312.04916, §3), or the weighted mean over the nested depth sub-models of
Sorted fine-tuning (SoFT, Kavehzadeh et al., arXiv:2309.08968, eq. 1: every sub-model of
depth ``d`` shares the output head and is trained on the same next-token loss).

Decoding (``exit_step``): after each exit a per-row score of that exit's distribution
(``"confidence"``: the max probability, as in CALM, Schuster et al., arXiv:2207.07061 §3.5;
``"entropy"``: ``1 - H(p) / log V``; ``"margin"``: top-1 minus top-2 probability) is compared
with a threshold; rows that reach it take that exit's logits. Layers between exits form
segments run under ``lax.cond``: once every row of the batch has exited, the remaining
segments are skipped, and a single compiled function serves every decision. The KV of the
layers a token skipped comes from one of two rules (``exit_state``):

``"propagate"`` (CALM §3.3, state propagation)
  The exit hidden state is copied to the skipped layers: their keys and values for the token
  are their K/V projections of that state. Rows that exited while others continue are fed the
  frozen exit state, so the batched block computes exactly that.
``"recompute"`` (EE-LLM §4.2, KV recomputation)
  The skipped layers' KV is left missing and filled on the next pass that reaches them: that
  segment then runs on the pending tokens together with the new one (a chunk of up to
  ``_RECOMPUTE_WINDOW`` tokens, their hidden states kept where they stopped). A row whose
  pending chunk would overflow goes to full depth. The cache then always equals the full
  model's, so each token's exit logits are those of a full forward at its position.

Only attention mixers are supported on the exit path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models.configs import ModelConfig
from models.layers import make_norm
from models.moe import combine_aux
from models.state import DecodeState, Segment

EXIT_MEASURES = ("confidence", "entropy", "margin")
EXIT_STATES = ("propagate", "recompute")
_RECOMPUTE_WINDOW = 16  # most tokens one deferred-recomputation chunk holds


class ExitHeads(nnx.Module):
    """One norm per exit, then the model's head (``"shared"``) or an own head (``"separate"``,
    each built by ``make_head(cfg, rngs=rngs)``)."""

    def __init__(self, cfg: ModelConfig, make_head, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.norms = nnx.List(
            [
                make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
                for _ in cfg.exit_layers
            ]
        )
        self.heads = nnx.data(None)
        if cfg.exit_head == "separate":
            self.heads = nnx.List([make_head(cfg, rngs=rngs) for _ in cfg.exit_layers])


@struct.dataclass
class EarlyExitOutput:
    """``model(tokens)`` of a model with exits (a pytree).

    Attributes:
      logits: float32 ``[B, T, V]`` of the final layer.
      exit_logits: float32 ``[X, B, T, V]``, exit ``i`` after ``config.exit_layers[i]`` blocks.
      aux_loss, router_stats: as in ``LMOutput`` for a model with MoE layers, else ``None``.
    """

    logits: jax.Array
    exit_logits: jax.Array
    aux_loss: jax.Array | None = None
    router_stats: dict | None = None


def exit_logits(model, index: int, x_BTD):
    """Float32 logits of exit ``index`` read from the residual stream ``x_BTD`` after
    ``exit_layers[index]`` blocks; ``index == len(exit_layers)`` is the final head."""
    if index == len(model.config.exit_layers):
        return model.head(x_BTD)
    heads = model.exits.heads
    return model.logits(model.exits.norms[index](x_BTD), None if heads is None else heads[index])


def forward(model, tokens_BT) -> EarlyExitOutput:
    """The stateless causal forward with every exit's logits (what ``model(tokens)`` returns)."""
    B, T = tokens_BT.shape
    segment = Segment.full(B, T)
    depths = model.config.exit_layers
    x_BTD = model.embed_tokens(tokens_BT)
    exits, auxes = [], []
    for i, block in enumerate(model.blocks):
        x_BTD, _, aux = block(x_BTD, segment, None)
        auxes.append(aux)
        if i + 1 in depths:
            exits.append(exit_logits(model, len(exits), x_BTD))
    auxes = [a for a in auxes if a is not None]
    extras = combine_aux(auxes, model.config) if auxes else ()
    return EarlyExitOutput(model.head(x_BTD), jnp.stack(exits), *extras)


def step_to_exit(model, tokens_BT, state: DecodeState, index: int, *, num_new_B=None):
    """Append ``tokens_BT`` through the blocks up to exit ``index`` and return its logits.

    The building block of self-speculative drafting: only layers ``< exit_layers[index]``
    (all of them for ``index == len(exit_layers)``) see the tokens and update their state;
    deeper layers' state and ``state.extras`` are left as they were.

    Returns:
      ``(logits_BTV, state)``: float32 logits of exit ``index`` and the new state.
    """
    depths = (*model.config.exit_layers, model.config.num_layers)
    B, T = tokens_BT.shape
    if num_new_B is None:
        num_new_B = jnp.full((B,), T, jnp.int32)
    segment = Segment(state.lengths_B, state.lengths_B + num_new_B, T, False)
    x_BTD = model.embed_tokens(tokens_BT)
    x_BTD, layers = _run_blocks(model, x_BTD, segment, state.layers, 0, depths[index])
    logits_BTV = exit_logits(model, index, x_BTD)
    return logits_BTV, state.replace(lengths_B=segment.lengths_B, layers=layers)


def exit_loss(out: EarlyExitOutput, targets_BT, mask_BT, cfg: ModelConfig):
    """The multi-exit training objective of ``cfg.exit_loss`` (see the module docstring).

    Returns:
      ``(loss, metrics)``: float32 scalar and ``{"exit{d}_loss": CE at depth d}`` per exit.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    denom = jnp.maximum(mask_BT.sum(), 1.0)

    def ce(logits_BTV):
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
        nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        return jnp.sum(nll_BT * mask_BT) / denom

    ces = [ce(out.exit_logits[i]) for i in range(len(cfg.exit_layers))] + [ce(out.logits)]
    weights = cfg.exit_loss_weights or (1.0,) * len(ces)
    loss = sum(w * c for w, c in zip(weights, ces, strict=True))
    if cfg.exit_loss == "sorted":
        loss = loss / sum(weights)
    depths = (*cfg.exit_layers, cfg.num_layers)
    return loss, {f"exit{d}_loss": c for d, c in zip(depths, ces, strict=True)}


def exit_score(logits_BV, measure: str):
    """Per-row score in ``[0, 1]`` of a distribution; a row exits when it reaches the
    threshold. ``measure``: ``"confidence"``, ``"entropy"`` or ``"margin"``."""
    p_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    if measure == "confidence":
        return jnp.max(p_BV, axis=-1)
    if measure == "entropy":
        h_B = -jnp.sum(jnp.where(p_BV > 0, p_BV * jnp.log(p_BV), 0.0), axis=-1)
        return 1.0 - h_B / jnp.log(float(p_BV.shape[-1]))
    top2_B2 = jax.lax.top_k(p_BV, 2)[0]
    return top2_B2[:, 0] - top2_B2[:, 1]


def check_exit_options(model, threshold, measure: str, mode: str) -> None:
    """Errors for exit options the model or the values do not allow."""
    cfg = model.config
    if not cfg.exit_layers:
        raise ValueError(
            f"exit_threshold={threshold} needs a model with exits, but config "
            f"{cfg.name!r} has exit_layers=() (try the 'early-exit-tiny' preset)"
        )
    if measure not in EXIT_MEASURES:
        raise ValueError(f"unknown exit_measure {measure!r}; valid: {list(EXIT_MEASURES)}")
    if mode not in EXIT_STATES:
        raise ValueError(f"unknown exit_state {mode!r}; valid: {list(EXIT_STATES)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"exit_threshold must be in [0, 1] for exit_measure={measure!r}, got {threshold}"
        )
    bad = sorted({cfg.mixer(i) for i in range(cfg.num_layers)} - {"attention"})
    if bad:
        raise ValueError(f"early exit supports attention mixers only; {cfg.name!r} has {bad}")


def init_exit_state(model, state: DecodeState, mode: str) -> DecodeState:
    """Add the bookkeeping of ``mode`` to a prefilled state (every layer valid to its length).

    ``"recompute"`` keeps ``filled_XB`` (positions valid in the segment after exit ``i``) and
    ``hidden_BSD`` (each pending token's residual stream where its computation stopped).
    """
    if mode != "recompute":
        return state
    X, cfg = len(model.config.exit_layers), model.config
    S = state.layers[0].k_BSKH.shape[1]
    B = state.batch_size
    return state.replace(
        extras=dict(
            state.extras,
            filled_XB=jnp.broadcast_to(state.lengths_B, (X, B)),
            hidden_BSD=jnp.zeros((B, S, cfg.d_model), jnp.dtype(cfg.dtype)),
        )
    )


def _run_blocks(model, x_BTD, segment, layers, lo: int, hi: int, frozen_B=None):
    """Blocks ``lo..hi-1`` with their states; rows in ``frozen_B`` keep their input stream."""
    layers = list(layers)
    for i in range(lo, hi):
        y_BTD, layers[i], _ = model.blocks[i](x_BTD, segment, layers[i])
        x_BTD = y_BTD if frozen_B is None else jnp.where(frozen_B[:, None, None], x_BTD, y_BTD)
    return x_BTD, tuple(layers)


def _propagate_kv(model, x_BTD, segment, layers, lo: int, hi: int):
    """CALM state propagation: layers ``lo..hi-1`` store the K/V projections of ``x_BTD``."""
    layers = list(layers)
    for i in range(lo, hi):
        block = model.blocks[i]
        _, k_BTKH, v_BTKH = block.mixer.project(block.mixer_norm(x_BTD), segment.positions_BT)
        layers[i] = layers[i].write(k_BTKH, v_BTKH, segment)
    return tuple(layers)


def exit_step(model, tok_B, state: DecodeState, threshold, *, measure: str, mode: str):
    """One decode step with early exit for every row of the batch.

    Args:
      model: an ``LM`` with exits.
      tok_B: int32 tokens, one per row, appended at position ``state.lengths_B``.
      state: from prefill and ``init_exit_state(model, state, mode)``.
      threshold: float32 scalar; ``>= 1`` never exits (a saturated softmax does not count).
      measure, mode: an ``EXIT_MEASURES`` and an ``EXIT_STATES`` name (static).

    Returns:
      ``(logits_B1V, state, depth_B)``: the logits of each row's exit, the new state and the
      depth (blocks run) of that exit.
    """
    cfg = model.config
    X, L = len(cfg.exit_layers), cfg.num_layers
    bounds = (0, *cfg.exit_layers, L)
    B = tok_B.shape[0]
    cur_B = state.lengths_B
    W = _RECOMPUTE_WINDOW if mode == "recompute" else 1
    seg1 = Segment(cur_B, cur_B + 1, 1, False)
    x_BTD, layers = _run_blocks(
        model, model.embed_tokens(tok_B[:, None]), seg1, state.layers, 0, bounds[1]
    )
    if mode == "recompute":
        filled_XB, hid_BSD = state.extras["filled_XB"], state.extras["hidden_BSD"]
        x_BTD = jnp.pad(x_BTD, ((0, 0), (0, W - 1), (0, 0)))  # a chunk of W from position cur
        may_exit_B = cur_B - filled_XB[X - 1] + 2 <= W  # the next step's chunk must fit too
    else:
        may_exit_B = jnp.ones((B,), bool)
    start_B = cur_B  # position of chunk index 0
    exited_B = jnp.zeros((B,), bool)
    logits_BV = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    depth_B = jnp.full((B,), L, jnp.int32)
    new_filled = []
    for j in range(X):
        h_B1D = jnp.take_along_axis(x_BTD, (cur_B - start_B)[:, None, None], axis=1)
        lj_BV = exit_logits(model, j, h_B1D)[:, 0]
        hit_B = ~exited_B & may_exit_B & (threshold < 1.0)
        hit_B &= exit_score(lj_BV, measure) >= threshold
        logits_BV = jnp.where(hit_B[:, None], lj_BV, logits_BV)
        depth_B = jnp.where(hit_B, bounds[j + 1], depth_B)
        exited_B = exited_B | hit_B
        lo, hi = bounds[j + 1], bounds[j + 2]
        if mode == "propagate":

            def run(x_BTD, layers, lo=lo, hi=hi, frozen_B=exited_B):
                return _run_blocks(model, x_BTD, seg1, layers, lo, hi, frozen_B)

            def skip(x_BTD, layers, lo=lo, hi=hi):
                return x_BTD, _propagate_kv(model, x_BTD, seg1, layers, lo, hi)

            x_BTD, layers = jax.lax.cond(jnp.all(exited_B), skip, run, x_BTD, layers)
            continue

        def run_chunk(x_BTD, start_B, layers, lo=lo, hi=hi, j=j):
            # Pending tokens of this segment: positions filled..cur. Those before the previous
            # chunk's start stopped here on earlier steps (their stream is in hid_BSD).
            new_B = filled_XB[j]
            pos_BW = new_B[:, None] + jnp.arange(W)
            S = hid_BSD.shape[1]
            old_BWD = jnp.take_along_axis(hid_BSD, jnp.clip(pos_BW, 0, S - 1)[..., None], axis=1)
            idx_BW = jnp.clip(pos_BW - start_B[:, None], 0, W - 1)
            cur_BWD = jnp.take_along_axis(x_BTD, idx_BW[..., None], axis=1)
            x_BTD = jnp.where((pos_BW < start_B[:, None])[..., None], old_BWD, cur_BWD)
            segment = Segment(new_B, cur_B + 1, W, False)
            x_BTD, layers = _run_blocks(model, x_BTD, segment, layers, lo, hi)
            return x_BTD, new_B, layers

        def keep(x_BTD, start_B, layers):
            return x_BTD, start_B, layers

        ran = ~jnp.all(exited_B)
        x_BTD, start_B, layers = jax.lax.cond(ran, run_chunk, keep, x_BTD, start_B, layers)
        new_filled.append(jnp.where(ran, cur_B + 1, filled_XB[j]))

    def final(x_BTD, logits_BV):
        h_B1D = jnp.take_along_axis(x_BTD, (cur_B - start_B)[:, None, None], axis=1)
        return jnp.where(exited_B[:, None], logits_BV, model.head(h_B1D)[:, 0])

    logits_BV = jax.lax.cond(jnp.all(exited_B), lambda x, lg: lg, final, x_BTD, logits_BV)
    extras = state.extras
    if mode == "recompute":
        # Every chunk token stopped at the depth the last run segment reached.
        pos_BW = start_B[:, None] + jnp.arange(W)
        pos_BW = jnp.where(pos_BW <= cur_B[:, None], pos_BW, hid_BSD.shape[1])
        b_BW = jnp.broadcast_to(jnp.arange(B)[:, None], (B, W))
        hid_BSD = hid_BSD.at[b_BW, pos_BW].set(x_BTD.astype(hid_BSD.dtype), mode="drop")
        extras = dict(extras, filled_XB=jnp.stack(new_filled), hidden_BSD=hid_BSD)
    state = state.replace(lengths_B=seg1.lengths_B, layers=layers, extras=extras)
    return logits_BV[:, None], state, depth_B
