"""Self-speculative decoding (models.speculative): token-identical to plain greedy, accepted
counts against a cache-free python loop, all drafts accepted when the skipped layers are
identities, and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.helpers import sharpened_early_exit_model

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]
NEW = 11  # not a multiple of k + 1 for k = 1, 3, 4
PAD = 32


@pytest.fixture(scope="module")
def model():
    return sharpened_early_exit_model()


_forward = jax.jit(lambda m, tokens_BT: m(tokens_BT))


def _logits(model, index, seq):
    """Exit ``index``'s and the final layer's logits at every position of ``seq``."""
    tokens = np.zeros((1, PAD), np.int32)
    tokens[0, : len(seq)] = seq
    out = _forward(model, jnp.asarray(tokens))
    return np.asarray(out.exit_logits[index, 0]), np.asarray(out.logits[0])


@pytest.fixture(scope="module")
def plain(model):
    """Plain greedy tokens, and a stop token that cuts the first row mid-way."""
    seq = list(PROMPTS[0])
    for _ in range(7):
        seq.append(int(np.argmax(_logits(model, 0, seq)[1][len(seq) - 1])))
    stop = seq[-1]
    cut = models.generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop]).tokens
    assert len(cut[0]) < NEW
    return stop, cut


def _oracle(model, prompt, index, k, stops):
    """One row of self-speculative decoding with full forwards and no cache: the draft is the
    exit's greedy token, the check the final layer's. Returns (tokens, accepted, passes)."""

    def logits(seq):
        return _logits(model, index, seq)

    seq = list(prompt)
    out = [int(np.argmax(logits(seq)[1][len(seq) - 1]))]
    accepted = passes = 0
    while len(out) < NEW and out[-1] not in stops:
        drafts = []
        for _ in range(k):
            ctx = seq + out + drafts
            drafts.append(int(np.argmax(logits(ctx)[0][len(ctx) - 1])))
        full = logits(seq + out + drafts)[1]
        p = len(seq) + len(out) - 1
        g = [int(np.argmax(full[p + j])) for j in range(k + 1)]
        n = 0
        while n < k and drafts[n] == g[n]:
            n += 1
        accepted, passes = accepted + n, passes + 1
        for t in g[: n + 1]:
            if len(out) < NEW and out[-1] not in stops:
                out.append(t)
    return out, accepted, passes


@pytest.mark.parametrize("k, depth", [(1, 2), (3, 1), (4, 2)])
def test_matches_greedy_and_oracle(model, plain, k, depth):
    stop, want = plain
    res = models.generate(
        model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop], draft_exit=depth, draft_tokens=k
    )
    assert res.tokens == want
    index = model.config.exit_layers.index(depth)
    rows = [_oracle(model, p, index, k, {stop}) for p in PROMPTS]
    assert [r[0] for r in rows] == want
    accepted, row_passes = sum(r[1] for r in rows), sum(r[2] for r in rows)
    assert res.stats["accepted_per_verify"] == pytest.approx(accepted / row_passes)
    assert res.stats["verify_passes"] == max(r[2] for r in rows)
    assert res.stats["decode_steps"] == res.stats["verify_passes"]


def test_identity_tail_accepts_every_draft():
    # Blocks after the draft exit add zero to the residual stream and the exit norm equals
    # the final norm (both ones), so the shared head gives the draft the final logits.
    m = models.build(models.get_config("early-exit-tiny"), seed=1)
    m.lm_head.kernel[...] *= 40
    for block in m.blocks[1:]:
        block.mixer.o.kernel[...] = 0.0
        block.channel.down.kernel[...] = 0.0
    k = 3
    res = models.generate(m, PROMPTS, max_new_tokens=NEW, draft_exit=1, draft_tokens=k)
    assert res.stats["accepted_per_verify"] == k
    # Each pass emits k + 1 tokens per row after the prefill token.
    assert res.stats["verify_passes"] == -(-(NEW - 1) // (k + 1))
    assert res.tokens == models.generate(m, PROMPTS, max_new_tokens=NEW).tokens


def test_errors(model):
    def gen(m=model, **kw):
        return models.generate(m, PROMPTS, max_new_tokens=4, **kw)

    with pytest.raises(ValueError, match=r"valid: \[1, 2\]"):
        gen(draft_exit=3, draft_tokens=2)
    with pytest.raises(ValueError, match="needs both"):
        gen(draft_exit=1)
    with pytest.raises(ValueError, match="needs both"):
        gen(draft_tokens=2)
    with pytest.raises(ValueError, match="draft_tokens must be a positive int"):
        gen(draft_exit=1, draft_tokens=0)
    with pytest.raises(ValueError, match="greedy only"):
        gen(draft_exit=1, draft_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="cannot be combined"):
        gen(draft_exit=1, draft_tokens=2, exit_threshold=0.5)
    with pytest.raises(ValueError, match="exit_layers=()"):
        gen(models.build(models.get_config("dense-tiny")), draft_exit=1, draft_tokens=2)
    hybrid = models.get_config("early-exit-tiny").replace(mixer_pattern=("mamba2", "attention"))
    with pytest.raises(ValueError, match=r"only attention KV caches.*'mamba2'"):
        gen(models.abstract(hybrid), draft_exit=1, draft_tokens=2)
