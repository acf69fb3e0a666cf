"""Self-speculative greedy decoding: draft with an early exit, verify with the full model.

The model drafts ``k`` tokens greedily with its own first blocks and an exit head
(``early_exit.step_to_exit``), then runs the full model once over the ``k + 1`` positions
(the last committed token and the ``k`` drafts) with ``model.step``. As in LayerSkip
(Elhoushi et al., arXiv:2404.16710, §4) and Draft & Verify (Zhang et al., arXiv:2309.08168,
§3), the longest prefix of drafts equal to the full model's greedy tokens is accepted, plus the
full model's token after it (the correction at the first disagreement, or the bonus token when
all ``k`` agree). Every emitted token is a full-model greedy token, so the output equals plain
greedy decoding; each verification emits ``1 + accepted`` tokens.

Rejected drafts are rolled back by resetting ``lengths_B``: attention caches are indexed by
position and ignore entries at or past a row's length, and the next verification overwrites
them. The verify pass rewrites the drafted positions of the shallow layers too (with the same
inputs), so every cached key and value is the full model's. Recurrent states cannot be rolled
back that way, so only attention mixers are allowed.

Rows of a batch accept different counts; each row keeps its own length and output count, so
one compiled decode loop serves every decision.

Usage: ``models.generate(model, prompts, max_new_tokens=64, draft_exit=2, draft_tokens=4)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.early_exit import step_to_exit

_PAD = -1


def check_options(model, draft_exit, draft_tokens, *, temperature, exit_threshold) -> tuple:
    """Validate the self-speculative options of ``generate``.

    Args:
      draft_exit: the depth (blocks run) of the exit that drafts; one of ``exit_layers``.
      draft_tokens: tokens drafted per verification, ``>= 1``.

    Returns:
      ``(exit_index, draft_tokens)``, the static options of ``make_decode``.
    """
    cfg = model.config
    if draft_exit is None or draft_tokens is None:
        raise ValueError(
            "self-speculative decoding needs both draft_exit (an exit depth) and draft_tokens "
            f"(tokens per verification), got draft_exit={draft_exit!r}, "
            f"draft_tokens={draft_tokens!r}"
        )
    if not cfg.exit_layers:
        raise ValueError(
            f"draft_exit needs a model with exits, but config {cfg.name!r} has exit_layers=() "
            "(try the 'early-exit-tiny' preset)"
        )
    if draft_exit not in cfg.exit_layers:
        raise ValueError(
            f"draft_exit={draft_exit!r} is not an exit depth of {cfg.name!r}; valid: "
            f"{list(cfg.exit_layers)}"
        )
    if not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be a positive int, got {draft_tokens!r}")
    if temperature != 0.0:
        raise ValueError(
            f"self-speculative decoding is greedy only (temperature=0.0), got temperature="
            f"{temperature}; speculative sampling is not implemented"
        )
    if exit_threshold is not None:
        raise ValueError("draft_exit and exit_threshold cannot be combined; choose one")
    bad = sorted({cfg.mixer(i) for i in range(cfg.num_layers)} - {"attention"})
    if bad:
        raise ValueError(
            "self-speculative decoding rolls rejected drafts back by resetting cache lengths, "
            f"which only attention KV caches allow; {cfg.name!r} has mixers {bad}"
        )
    return cfg.exit_layers.index(draft_exit), draft_tokens


def make_decode(graphdef, batch: int, max_new: int, exit_index: int, k: int):
    """The speculative decode loop, with the signature of ``generate``'s decode function.

    ``decode(params, state, tok_B, key, temperature, top_p, stops_S)`` returns
    ``(out_BM, passes + 1, state, counts_3)``: generated tokens (``_PAD`` after the end),
    the loop count (``generate`` reports ``decode_steps = passes``), the state, and int32
    ``[verify passes, accepted drafts, row verifications]`` (rows count while not done).
    """

    def decode(params, state, tok_B, key, temperature, top_p, stops_S):
        del key, temperature, top_p  # greedy only
        model = nnx.merge(graphdef, params)
        out_BM = jnp.full((batch, max_new), _PAD, jnp.int32).at[:, 0].set(tok_B)
        count_B = jnp.ones((batch,), jnp.int32)
        done_B = jnp.isin(tok_B, stops_S) | (count_B >= max_new)
        j_J = jnp.arange(k + 1, dtype=jnp.int32)

        def cond(carry):
            return ~jnp.all(carry[5])

        def body(carry):
            _, tok_B, state, out_BM, count_B, done_B, counts_3 = carry
            start_B = state.lengths_B

            def draft(carry, _):
                t_B, st = carry
                logits_B1V, st = step_to_exit(model, t_B[:, None], st, exit_index)
                nxt_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
                return (nxt_B, st), nxt_B

            (_, state), d_KB = jax.lax.scan(draft, (tok_B, state), None, length=k)
            d_BK = d_KB.T
            # One full pass over [last committed token, drafts]; g[j] is the full model's
            # greedy token after position start + j.
            state = state.replace(lengths_B=start_B)
            logits_BJV, state = model.step(jnp.concatenate([tok_B[:, None], d_BK], 1), state)
            g_BJ = jnp.argmax(logits_BJV, axis=-1).astype(jnp.int32)
            agree_BK = (d_BK == g_BJ[:, :k]).astype(jnp.int32)
            n_B = jnp.sum(jnp.cumprod(agree_BK, axis=1), axis=1)
            # Accepted drafts equal g[:n]; g[n] is the correction or bonus: emit g[: n + 1],
            # cut after the first stop token and at the budget.
            valid_BJ = (j_J <= n_B[:, None]) & ~done_B[:, None]
            stop_BJ = jnp.isin(g_BJ, stops_S) & valid_BJ
            first_stop_B = jnp.where(stop_BJ.any(1), jnp.argmax(stop_BJ, axis=1), k + 1)
            pos_BJ = count_B[:, None] + j_J
            valid_BJ &= (j_J <= first_stop_B[:, None]) & (pos_BJ < max_new)
            b_BJ = jnp.broadcast_to(jnp.arange(batch)[:, None], pos_BJ.shape)
            out_BM = out_BM.at[b_BJ, jnp.where(valid_BJ, pos_BJ, max_new)].set(g_BJ, mode="drop")
            count_B = count_B + valid_BJ.sum(1)
            active_B = ~done_B
            done_B = done_B | stop_BJ.any(1) | (count_B >= max_new)
            nxt_B = jnp.take_along_axis(g_BJ, n_B[:, None], axis=1)[:, 0]
            # Committed: the previous token and the accepted drafts; the rest rolls back.
            lengths_B = jnp.where(active_B, start_B + n_B + 1, start_B)
            state = state.replace(lengths_B=lengths_B)
            counts_3 = counts_3 + jnp.stack(
                [1, jnp.sum(jnp.where(active_B, n_B, 0)), jnp.sum(active_B)]
            ).astype(jnp.int32)
            return counts_3[0], nxt_B, state, out_BM, count_B, done_B, counts_3

        counts_3 = jnp.zeros((3,), jnp.int32)
        carry = (jnp.int32(0), tok_B, state, out_BM, count_B, done_B, counts_3)
        passes, _, state, out_BM, _, _, counts_3 = jax.lax.while_loop(cond, body, carry)
        return out_BM, passes + 1, state, counts_3

    return decode


def stats(counts_3) -> dict[str, float]:
    """``verify_passes`` (batched verification calls) and ``accepted_per_verify`` (mean
    drafts accepted per row verification, counted before cutting at a stop or the budget)."""
    passes, accepted, rows = (int(x) for x in jax.device_get(counts_3))
    return {"verify_passes": passes, "accepted_per_verify": accepted / rows if rows else 0.0}
