"""Batched generation with a decode state: ragged prefill, then an on-device token loop.

Prompts of different lengths are right-padded into one batch and prefilled in a single call
(each row's state ends at its own length); the decode loop is a ``lax.while_loop`` that runs
one-token steps for the whole batch until every row has hit a stop token or the budget. Both
functions are compiled ahead of time per shape bucket and cached, so the reported prefill and
decode seconds exclude compilation (reported separately as ``compile_s``).

Generation code knows nothing about mixers: whatever state ``model.init_state`` returns is
threaded through ``model.step``.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import early_exit, speculative
from models.sampling import sample
from partitioning.rules import active_sharding

_PAD = -1
_MAX_COMPILED = 32  # shape buckets kept compiled (least recently used dropped)
_COMPILED: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass
class GenerateResult:
    """``tokens[i]``: ids generated for prompt ``i`` (prompt excluded, stop token included).

    ``stats``: ``prefill_s``, ``decode_s``, ``compile_s``, ``prefill_tokens_per_s``,
    ``decode_tokens_per_s`` (generated tokens per decode second), ``tokens_per_s`` (generated
    tokens per second of prefill + decode), ``generated_tokens``, ``decode_steps``,
    ``batch_size``, ``cache_len``; with ``exit_threshold`` set, ``avg_layers`` (mean depth of
    the exits that produced the decode-step tokens; prefill runs full depth); with
    ``draft_exit`` set, ``verify_passes`` and ``accepted_per_verify`` (``models.speculative``).

    ``exit_depths[i]``: with ``exit_threshold`` set, the depth (blocks run) of the exit that
    produced each token of ``tokens[i]`` (the first, from prefill, is ``num_layers``).
    """

    tokens: list[list[int]]
    stats: dict[str, float]
    exit_depths: list[list[int]] | None = None


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def _signature(params) -> tuple:
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def _validate(model, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    cfg = model.config
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"prompt {i} has token id {lo if lo < 0 else hi} outside the vocabulary "
                f"[0, {cfg.vocab_size})"
            )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's maximum length {cfg.max_seq_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [1, {cfg.vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _chunked_prefill(model, state, tokens_BT, lengths_B, chunk: int):
    """Prefill in ``chunk``-token pieces (a ``fori_loop``): each piece appends its rows' real
    tokens to the state; a row's logits come from the piece holding its last token."""
    B, T = tokens_BT.shape
    n = -(-T // chunk)
    tokens_BT = jnp.pad(tokens_BT, ((0, 0), (0, n * chunk - T)))

    def piece(i, state, fresh):
        start = i * chunk
        new_B = jnp.clip(lengths_B - start, 0, chunk)
        toks = jax.lax.dynamic_slice_in_dim(tokens_BT, start, chunk, axis=1)
        logits, state = model.step(toks, state, num_new_B=new_B, fresh=fresh, last_only=True)
        return logits, state, (lengths_B > start) & (lengths_B <= start + chunk)

    logits_B1V, state, _ = piece(0, state, True)

    def body(i, carry):
        logits_B1V, state = carry
        new, state, last_B = piece(i, state, False)
        return jnp.where(last_B[:, None, None], new, logits_B1V), state

    return jax.lax.fori_loop(1, n, body, (logits_B1V, state))


def _build(
    graphdef,
    batch,
    prompt_len,
    cache_len,
    max_new,
    greedy,
    top_k,
    use_top_p,
    n_stop,
    chunk,
    exits=None,
    draft=None,
):
    """Compile the prefill and decode functions for one shape bucket.

    ``exits``: ``None``, or ``(measure, mode)`` of ``early_exit.exit_step``; the decode
    function then takes the exit threshold as a traced last argument. ``draft``: ``None``, or
    ``(exit_index, draft_tokens)`` for self-speculative decoding (``models.speculative``).
    """
    sampling = dict(greedy=greedy, top_k=top_k)

    def prefill(params, tokens_BT, lengths_B, key, temperature, top_p):
        model = nnx.merge(graphdef, params)
        state = model.init_state(batch, cache_len)
        if chunk is None or chunk >= prompt_len:
            logits_B1V, state = model.step(
                tokens_BT, state, num_new_B=lengths_B, fresh=True, last_only=True
            )
        else:
            logits_B1V, state = _chunked_prefill(model, state, tokens_BT, lengths_B, chunk)
        if exits is not None:
            state = early_exit.init_exit_state(model, state, exits[1])
        key, sub = jax.random.split(key)
        tok_B = sample(
            logits_B1V[:, 0],
            sub,
            temperature=temperature,
            top_p=top_p if use_top_p else None,
            **sampling,
        )
        return tok_B, state, key

    def decode(params, state, tok_B, key, temperature, top_p, stops_S, *threshold):
        model = nnx.merge(graphdef, params)
        out_BM = jnp.full((batch, max_new), _PAD, jnp.int32).at[:, 0].set(tok_B)
        done_B = jnp.isin(tok_B, stops_S)
        # Depth of the exit behind each token (None, no leaves, without exits).
        depth_BM = None if exits is None else jnp.full_like(out_BM, model.config.num_layers)

        def cond(carry):
            i, _, _, _, done_B, _, _ = carry
            return (i < max_new) & ~jnp.all(done_B)

        def body(carry):
            i, tok_B, state, out_BM, done_B, key, depth_BM = carry
            if exits is None:
                logits_B1V, state = model.step(tok_B[:, None], state)
            else:
                measure, mode = exits
                logits_B1V, state, d_B = early_exit.exit_step(
                    model, tok_B, state, threshold[0], measure=measure, mode=mode
                )
                depth_BM = depth_BM.at[:, i].set(d_B)
            key, sub = jax.random.split(key)
            nxt_B = sample(
                logits_B1V[:, 0],
                sub,
                temperature=temperature,
                top_p=top_p if use_top_p else None,
                **sampling,
            )
            nxt_B = jnp.where(done_B, _PAD, nxt_B)
            out_BM = out_BM.at[:, i].set(nxt_B)
            done_B = done_B | jnp.isin(nxt_B, stops_S)
            return i + 1, nxt_B, state, out_BM, done_B, key, depth_BM

        carry = (jnp.int32(1), tok_B, state, out_BM, done_B, key, depth_BM)
        steps, _, state, out_BM, _, _, depth_BM = jax.lax.while_loop(cond, body, carry)
        # Returning the state lets XLA update the donated cache.
        return out_BM, steps, state, depth_BM

    if draft is not None:
        decode = speculative.make_decode(graphdef, batch, max_new, *draft)
    return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int | None = None,
    exit_threshold: float | None = None,
    exit_measure: str = "confidence",
    exit_state: str = "propagate",
    draft_exit: int | None = None,
    draft_tokens: int | None = None,
) -> GenerateResult:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a ``models.LM`` (anything with ``config``, ``init_state`` and ``step``).
      prompts: token-id lists, of different lengths.
      max_new_tokens: generation budget per prompt.
      temperature: ``0.0`` is greedy decoding; otherwise the softmax temperature.
      top_k, top_p: optional top-k and nucleus filtering (ignored when greedy).
      seed: PRNG seed for sampling.
      stop_tokens: ids that end a sequence (included in its output).
      prefill_chunk: prefill long prompts in pieces of this many tokens (the state carries
        between them), bounding prefill memory (an attention score block is ``chunk x cache``
        instead of ``prompt x prompt``); ``None`` prefills in one call. Same tokens either way.
      exit_threshold: early exit at decode steps (``models.early_exit``; a model with
        ``exit_layers``): a row takes the first exit whose ``exit_measure`` score reaches it,
        in ``[0, 1]``; ``1.0`` never exits, ``0.0`` always takes the first. ``None``: no exits.
      exit_measure: ``"confidence"`` (max probability), ``"entropy"`` (``1 - H / log V``) or
        ``"margin"`` (top-1 minus top-2 probability).
      exit_state: KV of skipped layers: ``"propagate"`` (from the exit hidden state, CALM)
        or ``"recompute"`` (computed on the next pass that reaches them, EE-LLM).
      draft_exit, draft_tokens: self-speculative greedy decoding (``models.speculative``,
        LayerSkip): the exit at depth ``draft_exit`` (one of ``exit_layers``) drafts
        ``draft_tokens`` tokens, the full model verifies them in one pass; same tokens as
        plain greedy. Adds ``stats["accepted_per_verify"]`` and ``stats["verify_passes"]``.

    Returns:
      ``GenerateResult`` with ``.tokens`` and ``.stats``.
    """
    _validate(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
    exits = None
    if exit_threshold is not None:
        early_exit.check_exit_options(model, exit_threshold, exit_measure, exit_state)
        exits = (exit_measure, exit_state)
    draft = None
    if draft_exit is not None or draft_tokens is not None:
        draft = speculative.check_options(
            model, draft_exit, draft_tokens, temperature=temperature, exit_threshold=exit_threshold
        )
    cfg = model.config
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    prompt_len = min(_bucket(int(lengths.max())), cfg.max_seq_len - max_new_tokens)
    slack = 0 if draft is None else draft[1] + 1  # a verify pass writes past the budget
    cache_len = min(-(-(prompt_len + max_new_tokens + slack) // 64) * 64, cfg.max_seq_len)
    tokens = np.zeros((batch, prompt_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    stops = np.array(sorted(set(stop_tokens)) or [_PAD], np.int32)
    greedy = temperature == 0.0
    graphdef, params = nnx.split(model)
    spec = (
        graphdef,
        batch,
        prompt_len,
        cache_len,
        max_new_tokens,
        greedy,
        None if greedy else top_k,
        top_p is not None and not greedy,
        len(stops),
        prefill_chunk,
    ) + (() if exits is None and draft is None else (exits, draft))
    args = (
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p or 1.0),
    )
    active = active_sharding()  # traced-in activation shardings are part of the program
    layout = None if active is None else (active[0], tuple(sorted(active[1].items())))
    key = (spec, _signature(params), layout)
    extra = () if exits is None else (jnp.float32(exit_threshold),)
    t0 = time.perf_counter()
    if key not in _COMPILED:
        prefill_jit, decode_jit = _build(*spec)
        tok_B, state, rng = jax.eval_shape(prefill_jit, *args)
        _COMPILED[key] = (
            prefill_jit.lower(*args).compile(),
            decode_jit.lower(
                params, state, tok_B, rng, *args[-2:], jnp.asarray(stops), *extra
            ).compile(),
        )
        if len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    prefill, decode = _COMPILED[key]
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok_B, state, rng = jax.block_until_ready(prefill(*args))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_BM, steps, _, depth_BM = jax.block_until_ready(
        decode(params, state, tok_B, rng, *args[-2:], jnp.asarray(stops), *extra)
    )
    decode_s = time.perf_counter() - t0

    out_BM = np.asarray(out_BM)
    stop_set = set(stop_tokens)
    results = []
    for row in out_BM:
        seq = []
        for t in row.tolist():
            if t == _PAD:
                break
            seq.append(t)
            if t in stop_set:
                break
        results.append(seq)
    generated = sum(len(s) for s in results)
    stats = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "compile_s": compile_s,
        "prefill_tokens_per_s": float(lengths.sum()) / prefill_s,
        "decode_tokens_per_s": max(generated - batch, 0) / decode_s if decode_s else 0.0,
        "tokens_per_s": generated / (prefill_s + decode_s),
        "generated_tokens": generated,
        "decode_steps": int(steps) - 1,
        "batch_size": batch,
        "cache_len": cache_len,
    }
    if draft is not None:
        stats.update(speculative.stats(depth_BM))
    if exits is None:
        return GenerateResult(tokens=results, stats=stats)
    depths = [np.asarray(d)[: len(s)].tolist() for d, s in zip(depth_BM, results, strict=True)]
    decoded = [d for row in depths for d in row[1:]]
    stats["avg_layers"] = float(np.mean(decoded)) if decoded else float(cfg.num_layers)
    return GenerateResult(tokens=results, stats=stats, exit_depths=depths)
