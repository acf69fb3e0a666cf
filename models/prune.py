"""Layer dropping: remove whole blocks ranked by a redundancy score on calibration data.

Both criteria are model transforms (``model -> smaller model`` with the kept weights copied):

- ShortGPT (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than
  You Expect", arXiv:2403.03853): the Block Influence of block ``i`` is
  ``BI_i = 1 - E_{b,t}[cos(x_i, x_{i+1})]`` over the residual stream entering (``x_i``) and
  leaving (``x_{i+1}``) it, averaged over calibration tokens; the ``n`` blocks with the lowest
  BI are removed in one shot.
- SLEB (Song et al., "SLEB: Streamlining LLMs through Redundancy Verification and Elimination
  of Transformer Blocks", arXiv:2402.09025, Algorithm 1): remove one block at a time, each time
  the one whose removal leaves the lowest calibration perplexity, and score the remaining
  blocks again after every removal.

    model, report = models.prune(model, calibration_BT, num_drop=4, method="sleb")
    smaller = models.drop_layers(model, [3, 7])

Prune before quantizing (``models.quantize``): ``drop_layers`` rebuilds the model from its
config and copies weights by path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.progress import Progress
from models.configs import ModelConfig, shortest_cycle
from models.lm import LM, abstract
from models.state import Segment

METHODS = ("block_influence", "sleb")


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What ``prune`` measured and removed (layer numbers are the original model's).

    Attributes:
      method: ``"block_influence"`` or ``"sleb"``.
      scores: float64 ``[L]``, one per original layer: the Block Influence (lower is more
        redundant), or for SLEB the calibration perplexity of the model without that layer
        alone (the first round; lower is more redundant).
      dropped: removed layers in the order they were chosen (ascending score for
        ``block_influence``, removal order for SLEB).
      kept: the remaining layers, ascending; layer ``j`` of the pruned model is ``kept[j]``.
      perplexity_before / perplexity_after: calibration perplexity of the model before and
        after pruning.
      step_perplexities: SLEB's calibration perplexity after each removal (the last equals
        ``perplexity_after``); empty for ``block_influence``, which removes in one shot.
      step_scores: SLEB's per-layer perplexities of every round, ``[L]`` each, NaN at layers
        already removed; empty for ``block_influence``.
    """

    method: str
    scores: np.ndarray
    dropped: tuple[int, ...]
    kept: tuple[int, ...]
    perplexity_before: float
    perplexity_after: float
    step_perplexities: tuple[float, ...] = ()
    step_scores: tuple[np.ndarray, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (NaN scores become ``None``)."""

        def floats(a):
            return [None if np.isnan(v) else float(v) for v in np.asarray(a)]

        return dict(
            method=self.method,
            scores=floats(self.scores),
            dropped=list(self.dropped),
            kept=list(self.kept),
            perplexity_before=self.perplexity_before,
            perplexity_after=self.perplexity_after,
            step_perplexities=list(self.step_perplexities),
            step_scores=[floats(s) for s in self.step_scores],
        )


# --- dropping -----------------------------------------------------------------------------


def _check_model(model) -> ModelConfig:
    if not isinstance(model, LM):
        raise TypeError(f"expected a models.LM, got {type(model).__name__}")
    return model.config


def _check_layers(layers, num_layers: int) -> tuple[int, ...]:
    if isinstance(layers, (int, np.integer, str)) or not isinstance(layers, Sequence | np.ndarray):
        raise TypeError(f"layers must be a sequence of layer indices, got {layers!r}")
    layers = list(layers)
    not_int = [x for x in layers if isinstance(x, bool) or not isinstance(x, int | np.integer)]
    if not_int:
        raise TypeError(f"layer indices must be integers, got {not_int}")
    layers = [int(x) for x in layers]
    outside = sorted({x for x in layers if not 0 <= x < num_layers})
    if outside:
        raise ValueError(f"layers {outside} outside 0..{num_layers - 1}")
    repeated = sorted({x for x in layers if layers.count(x) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} listed more than once")
    if len(layers) == num_layers:
        raise ValueError(f"dropping all {num_layers} layers would leave no blocks")
    return tuple(layers)


def _kept(cfg: ModelConfig, layers) -> list[int]:
    drop = set(_check_layers(layers, cfg.num_layers))
    return [i for i in range(cfg.num_layers) if i not in drop]


# Per-layer ``ModelConfig`` fields and how dropping blocks rewrites them.
_PATTERNS = ("mixer_pattern", "channel_pattern")  # names repeated cyclically over layers
_LAYER_SETS = ("sliding_window_layers",)  # layer indices
_EXITS = ("exit_layers",)  # depths, with the per-exit exit_loss_weights


def _kept_exits(cfg: ModelConfig, kept: list[int]) -> list[tuple[int, int]]:
    """``(old exit index, new depth)`` of the exits that survive.

    An exit at depth ``d`` reads the stream leaving block ``d - 1``; it is dropped with that
    block, or when every block after it is dropped (it would sit on the final head).
    """
    position = {i: j for j, i in enumerate(kept)}
    return [
        (k, position[d - 1] + 1)
        for k, d in enumerate(cfg.exit_layers)
        if d - 1 in position and position[d - 1] + 1 < len(kept)
    ]


def pruned_config(cfg: ModelConfig, layers: Sequence[int]) -> ModelConfig:
    """``cfg`` without ``layers``: each kept layer keeps its mixer, channel and window.

    Patterns are unrolled over the kept layers and folded back to their shortest cycle;
    ``sliding_window_layers`` drops the removed layers and renumbers the rest; early exits
    (``exit_layers``, ``exit_loss_weights``) follow ``_kept_exits``.

    Raises:
      ValueError: bad ``layers``, or a per-layer field this function does not know.
    """
    kept = _kept(cfg, layers)
    known = {"num_layers", *_PATTERNS, *_LAYER_SETS, *_EXITS}
    unknown = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.name.endswith(("_pattern", "_layers")) and f.name not in known
    ]
    if unknown:
        raise ValueError(f"pruned_config does not know how to drop layers from {unknown}")
    overrides = {"num_layers": len(kept)}
    for name in _PATTERNS:
        pattern = getattr(cfg, name)
        overrides[name] = shortest_cycle(tuple(pattern[i % len(pattern)] for i in kept))
    for name in _LAYER_SETS:
        old = getattr(cfg, name)
        if old is not None:
            overrides[name] = tuple(j for j, i in enumerate(kept) if i in set(old))
    exits = _kept_exits(cfg, kept)
    overrides["exit_layers"] = tuple(depth for _, depth in exits)
    if cfg.exit_loss_weights is not None:  # one per exit, the final layer's last
        weights = cfg.exit_loss_weights
        overrides["exit_loss_weights"] = (*(weights[k] for k, _ in exits), weights[-1])
    if len(kept) < cfg.num_layers:
        overrides["name"] = f"{cfg.name}-{len(kept)}of{cfg.num_layers}-layers"
    new = cfg.replace(**overrides)
    for j, i in enumerate(kept):
        before = (cfg.mixer(i), cfg.channel(i), cfg.window(i))
        after = (new.mixer(j), new.channel(j), new.window(j))
        if before != after:
            raise ValueError(f"layer {i} (mixer, channel, window) {before} became {after}")
    return new


def drop_layers(model: LM, layers: Sequence[int]) -> LM:
    """A new model without the blocks ``layers``; every other weight is copied.

    Args:
      model: a ``models.LM``.
      layers: indices of the blocks to remove (any order, no repeats, at least one block kept).

    Returns:
      An ``LM`` whose config is ``pruned_config(model.config, layers)`` and whose block ``j``
      holds a copy of the weights of the ``j``-th kept block of ``model``; surviving exit
      heads keep their weights too.

    Raises:
      TypeError / ValueError: not an ``LM``, or bad indices (the message names them).
    """
    cfg = _check_model(model)
    new_cfg = pruned_config(cfg, layers)
    kept = _kept(cfg, layers)
    exits = _kept_exits(cfg, kept)
    source = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, state = nnx.split(abstract(new_cfg))
    target = nnx.to_flat_state(state)
    for path, variable in target:
        src = _source_path(path, kept, exits)
        if src not in source:
            raise ValueError(
                f"no weight {'/'.join(map(str, src))} in the model for "
                f"{'/'.join(map(str, path))} of the pruned one (quantized models: prune first)"
            )
        value = source[src][...]
        if (value.shape, value.dtype) != (variable.shape, variable.dtype):
            raise ValueError(
                f"{'/'.join(map(str, src))} is {value.dtype}{list(value.shape)}, the pruned "
                f"model expects {variable.dtype}{list(variable.shape)}"
            )
        variable.set_value(jnp.array(value, copy=True))
    return nnx.merge(graphdef, nnx.from_flat_state(target))


def _source_path(path: tuple, kept: list[int], exits: list[tuple[int, int]]) -> tuple:
    """The original model's path of the pruned model's variable ``path``."""
    if path[0] == "blocks":
        return ("blocks", kept[path[1]], *path[2:])
    if path[0] == "exits":  # exits/{norms,heads}/<exit index>/...
        return (*path[:2], exits[path[2]][0], *path[3:])
    return path


# --- scoring ------------------------------------------------------------------------------


def _check_tokens(tokens_BT, vocab_size: int, min_len: int) -> jax.Array:
    tokens = jnp.asarray(tokens_BT)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [B, T], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"calibration tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[0] < 1 or tokens.shape[1] < min_len:
        raise ValueError(f"calibration tokens need B >= 1 and T >= {min_len}, got {tokens.shape}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"calibration tokens span {lo}..{hi}, outside the vocab 0..{vocab_size - 1}"
        )
    return tokens.astype(jnp.int32)


def _batches(tokens_BT: jax.Array, batch_size: int | None):
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    step = tokens_BT.shape[0] if batch_size is None else batch_size
    return [tokens_BT[i : i + step] for i in range(0, tokens_BT.shape[0], step)]


@functools.partial(jax.jit, static_argnums=0)
def _cosine_sums(graphdef, state, tokens_BT):
    """``[L]``: sum over tokens of ``cos(x_i, x_{i+1})`` on the residual stream."""
    model = nnx.merge(graphdef, state)
    segment = Segment.full(*tokens_BT.shape)
    x_BTD = model.embed_tokens(tokens_BT)
    sums = []
    for block in model.blocks:
        y_BTD, _, _ = block(x_BTD, segment, None)
        x, y = x_BTD.astype(jnp.float32), y_BTD.astype(jnp.float32)
        norms_BT = jnp.sqrt((x * x).sum(-1) * (y * y).sum(-1))
        sums.append(((x * y).sum(-1) / jnp.maximum(norms_BT, jnp.finfo(jnp.float32).tiny)).sum())
        x_BTD = y_BTD
    return jnp.stack(sums)


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(graphdef, state, tokens_BT, keep_L):
    """Summed next-token negative log-likelihood with the blocks where ``keep_L`` is False
    skipped (their input passes through unchanged, as if removed)."""
    model = nnx.merge(graphdef, state)
    segment = Segment.full(*tokens_BT.shape)
    x_BTD = model.embed_tokens(tokens_BT)
    for i, block in enumerate(model.blocks):
        y_BTD, _, _ = block(x_BTD, segment, None)
        x_BTD = jnp.where(keep_L[i], y_BTD, x_BTD)
    logits_BTV = model.head(x_BTD[:, :-1])
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1).sum()


def block_influence(model: LM, tokens_BT, *, batch_size: int | None = None) -> np.ndarray:
    """ShortGPT's Block Influence of every block (arXiv:2403.03853).

    Args:
      model: a ``models.LM``.
      tokens_BT: integer calibration tokens ``[B, T]`` without padding.
      batch_size: rows per forward pass; ``None``: all at once.

    Returns:
      float64 ``[L]``: ``1 - mean over tokens of cos(x_i, x_{i+1})`` where ``x_i`` is the
      residual stream entering block ``i``. 0 for a block that leaves its input unchanged.
    """
    cfg = _check_model(model)
    tokens_BT = _check_tokens(tokens_BT, cfg.vocab_size, 1)
    graphdef, state = nnx.split(model)
    total = sum(
        np.asarray(_cosine_sums(graphdef, state, b), np.float64)
        for b in _batches(tokens_BT, batch_size)
    )
    return 1.0 - total / tokens_BT.size


def _perplexity(graphdef, state, batches, keep_L: np.ndarray) -> float:
    keep = jnp.asarray(keep_L)
    nll = sum(float(_nll_sum(graphdef, state, b, keep)) for b in batches)
    count = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    return float(np.exp(nll / count))


def prune(
    model: LM,
    calibration_tokens,
    *,
    num_drop: int,
    method: str = "block_influence",
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[LM, PruneReport]:
    """Remove the ``num_drop`` most redundant blocks of ``model``.

    Args:
      model: a ``models.LM``.
      calibration_tokens: integer ``[B, T]`` token ids, ``T >= 2``, without padding.
      num_drop: blocks to remove, ``1 <= num_drop < num_layers``.
      method: ``"block_influence"`` (ShortGPT, one shot by lowest BI) or ``"sleb"`` (SLEB,
        greedy by calibration perplexity, re-scored after each removal).
      batch_size: calibration rows per forward pass; ``None``: all at once.
      progress: show a progress bar over SLEB's candidate evaluations.

    Returns:
      ``(pruned_model, report)``: ``drop_layers(model, report.dropped)`` and a
      ``PruneReport``.
    """
    cfg = _check_model(model)
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {list(METHODS)}")
    L = cfg.num_layers
    if isinstance(num_drop, bool) or not isinstance(num_drop, int | np.integer):
        raise TypeError(f"num_drop must be an integer, got {num_drop!r}")
    if not 1 <= num_drop < L:
        raise ValueError(f"num_drop={num_drop} must be in 1..{L - 1} for a {L}-layer model")
    tokens_BT = _check_tokens(calibration_tokens, cfg.vocab_size, 2)
    batches = _batches(tokens_BT, batch_size)
    graphdef, state = nnx.split(model)
    keep = np.ones(L, bool)
    ppl_before = _perplexity(graphdef, state, batches, keep)
    step_ppl, step_scores = [], []
    if method == "block_influence":
        scores = block_influence(model, tokens_BT, batch_size=batch_size)
        dropped = [int(i) for i in np.argsort(scores, kind="stable")[:num_drop]]
        keep[dropped] = False
        ppl_after = _perplexity(graphdef, state, batches, keep)
    else:
        bar = None
        if progress:
            bar = Progress(total=sum(L - k for k in range(num_drop)), desc="sleb", interval_s=5.0)
        done, dropped = 0, []
        for _ in range(num_drop):
            ppl = np.full(L, np.nan)
            for i in np.flatnonzero(keep):
                trial = keep.copy()
                trial[i] = False
                ppl[i] = _perplexity(graphdef, state, batches, trial)
                done += 1
                if bar is not None:
                    bar.update(done, dropped=len(dropped), ppl=float(np.nanmin(ppl)))
            best = int(np.nanargmin(ppl))
            keep[best] = False
            dropped.append(best)
            step_ppl.append(float(ppl[best]))
            step_scores.append(ppl)
            if bar is not None:
                bar.update(done, dropped=len(dropped), ppl=float(ppl[best]))
        if bar is not None:
            bar.close()
        scores, ppl_after = step_scores[0], step_ppl[-1]
    report = PruneReport(
        method=method,
        scores=np.asarray(scores, np.float64),
        dropped=tuple(dropped),
        kept=tuple(int(i) for i in np.flatnonzero(keep)),
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        step_perplexities=tuple(step_ppl),
        step_scores=tuple(step_scores),
    )
    return drop_layers(model, dropped), report
