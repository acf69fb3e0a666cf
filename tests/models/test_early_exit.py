"""Early-exit family: exit heads and losses against hand computations, decode-time exits
against a naive per-token full-recompute oracle, compile reuse, and input errors."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import early_exit
from models.state import Segment
from tests.helpers import sharpened_early_exit_model

generate_mod = importlib.import_module("models.generate")  # the module, not the function

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9]]
NEW = 8


@pytest.fixture(scope="module")
def model():
    return sharpened_early_exit_model()


def _exit_head(m, j, h_BTD):
    """Exit ``j``'s logits written out by hand: exit norm, then the shared output head."""
    return m.logits(m.exits.norms[j](h_BTD))


@jax.jit
def _oracle_forward(m, tokens_T, depth_T, propagate):
    """Full causal forward where the token at position t runs ``depth_T[t]`` blocks; with
    ``propagate`` its stream then stays frozen in deeper layers (so their K/V come from it),
    otherwise deeper layers compute it normally. Returns the stream after each block."""
    x_1TD = m.embed_tokens(tokens_T[None])
    seg = Segment.full(1, tokens_T.shape[0])
    streams = []
    for layer, block in enumerate(m.blocks):
        y_1TD, _, _ = block(x_1TD, seg, None)
        keep_T = propagate & (depth_T <= layer)
        x_1TD = jnp.where(keep_T[None, :, None], x_1TD, y_1TD)
        streams.append(x_1TD[0])
    return jnp.stack(streams)  # [L, T, D]


def _oracle_logits(m, prompt, gen, depths, propagate, pad=32):
    """Logits of every decode step, recomputing the whole sequence from scratch each time
    with the recorded exit depths (python loop over tokens)."""
    L = m.config.num_layers
    out = []
    for i in range(1, len(gen)):
        seq = prompt + gen[:i]
        depth = [L] * len(prompt) + depths[1 : i + 1]
        p = len(seq) - 1
        tokens = np.zeros(pad, np.int32)
        tokens[: len(seq)] = seq
        dep = np.full(pad, L, np.int32)
        dep[: len(seq)] = depth
        streams = _oracle_forward(m, jnp.asarray(tokens), jnp.asarray(dep), propagate)
        per_exit = [
            _exit_head(m, j, streams[d - 1, p][None, None])[0, 0]
            for j, d in enumerate(m.config.exit_layers)
        ]
        final = m.head(streams[L - 1, p][None, None])[0, 0]
        out.append((per_exit, final, depths[i]))
    return out


def test_preset_and_config_errors():
    cfg = models.get_config("early-exit-tiny")
    assert cfg.exit_layers == (1, 2) and cfg.num_layers == 4
    assert models.ModelConfig.from_dict(cfg.to_dict()) == cfg
    for bad in [(0,), (4,), (2, 1), (1, 1)]:
        with pytest.raises(ValueError, match="exit_layers"):
            cfg.replace(exit_layers=bad)
    with pytest.raises(ValueError, match="exit_loss_weights"):
        cfg.replace(exit_loss_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="unknown exit_head"):
        cfg.replace(exit_head="tied")
    with pytest.raises(ValueError, match="unknown exit_loss"):
        cfg.replace(exit_loss="mean")


def test_exit_logits_and_losses_by_hand():
    cfg = models.get_config("early-exit-tiny", exit_loss_weights=(0.5, 0.25, 1.0))
    m = models.build(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
    out = m(tokens)
    assert isinstance(out, models.EarlyExitOutput)
    np.testing.assert_allclose(out.logits, m.step(tokens, None)[0], atol=1e-5)
    x = m.embed(tokens)  # embed_scale is 1
    seg = Segment.full(2, 6)
    hidden = []
    for block in m.blocks:
        x, _, _ = block(x, seg, None)
        hidden.append(x)
    for j, d in enumerate(cfg.exit_layers):
        h = m.exits.norms[j](hidden[d - 1])
        np.testing.assert_allclose(out.exit_logits[j], h @ m.lm_head.kernel[...], atol=1e-5)

    targets = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
    mask = jnp.ones((2, 6)).at[1, 4:].set(0.0)

    def ce(logits):
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]
        return (nll * np.asarray(mask)).sum() / np.asarray(mask).sum()

    ces = [ce(out.exit_logits[0]), ce(out.exit_logits[1]), ce(out.logits)]
    loss, metrics = models.exit_loss(out, targets, mask, cfg)
    np.testing.assert_allclose(loss, 0.5 * ces[0] + 0.25 * ces[1] + ces[2], rtol=1e-5)
    np.testing.assert_allclose(metrics["exit2_loss"], ces[1], rtol=1e-5)
    sorted_cfg = cfg.replace(exit_loss="sorted")
    loss, _ = models.exit_loss(out, targets, mask, sorted_cfg)
    np.testing.assert_allclose(loss, (0.5 * ces[0] + 0.25 * ces[1] + ces[2]) / 1.75, rtol=1e-5)

    sep = models.build(cfg.replace(exit_head="separate"), seed=1)
    extra = 2 * cfg.d_model * cfg.vocab_size
    assert models.count_params(sep) == models.count_params(m) + extra
    sep_out = sep(tokens)
    x, _, _ = sep.blocks[0](sep.embed(tokens), seg, None)
    h = sep.exits.norms[0](x) @ sep.exits.heads[0].kernel[...]
    np.testing.assert_allclose(sep_out.exit_logits[0], h, atol=1e-5)


def test_no_exit_models_unchanged():
    m = models.build(models.get_config("dense-tiny"))
    assert m.exits is None
    assert isinstance(m(jnp.zeros((1, 3), jnp.int32)), jax.Array)


@pytest.mark.parametrize("mode", ["propagate", "recompute"])
def test_decode_exits_match_oracle(model, mode):
    baseline = models.generate(model, PROMPTS, max_new_tokens=NEW)
    n_compiled = len(generate_mod._COMPILED)
    full = models.generate(model, PROMPTS, max_new_tokens=NEW, exit_threshold=1.0, exit_state=mode)
    assert full.tokens == baseline.tokens
    assert full.stats["avg_layers"] == model.config.num_layers
    first = models.generate(model, PROMPTS, max_new_tokens=NEW, exit_threshold=0.0, exit_state=mode)
    assert first.stats["avg_layers"] == model.config.exit_layers[0]
    assert all(d == 1 for row in first.exit_depths for d in row[1:])
    t = 0.6
    mid = models.generate(model, PROMPTS, max_new_tokens=NEW, exit_threshold=t, exit_state=mode)
    # One compiled decode function served every threshold and every exit decision.
    assert len(generate_mod._COMPILED) == n_compiled + 1
    depths = {d for row in mid.exit_depths for d in row[1:]}
    assert len(depths) > 1, depths  # the batch mixes exits
    for prompt, gen, dep in zip(PROMPTS, mid.tokens, mid.exit_depths, strict=True):
        steps = _oracle_logits(model, prompt, gen, dep, mode == "propagate")
        for i, (per_exit, final, d) in enumerate(steps, start=1):
            exits = model.config.exit_layers
            used = final if d == model.config.num_layers else per_exit[exits.index(d)]
            assert int(jnp.argmax(used)) == gen[i]
            # The recorded exit is the first whose confidence reaches the threshold.
            conf = [float(jnp.max(jax.nn.softmax(lg))) for lg in per_exit]
            first_hit = next((e for e, c in zip(exits, conf, strict=True) if c >= t), None)
            assert d == (first_hit or model.config.num_layers)


def test_exit_step_logits_match_oracle(model):
    """Cached ``exit_step`` logits equal the oracle's at the recorded exits (both rules)."""
    prompt = PROMPTS[1]
    for mode in ("propagate", "recompute"):
        state = model.init_state(1, 32)
        logits, state = model.step(jnp.asarray([prompt]), state, fresh=True, last_only=True)
        state = early_exit.init_exit_state(model, state, mode)
        step = jax.jit(early_exit.exit_step, static_argnames=("measure", "mode"))
        gen, depths, got = [int(jnp.argmax(logits[0, 0]))], [4], []
        for _ in range(6):
            lg, state, d = step(
                model, jnp.asarray([gen[-1]]), state, 0.6, measure="confidence", mode=mode
            )
            gen.append(int(jnp.argmax(lg[0, 0])))
            depths.append(int(d[0]))
            got.append(lg[0, 0])
        for lg, (per_exit, final, d) in zip(
            got, _oracle_logits(model, prompt, gen, depths, mode == "propagate"), strict=True
        ):
            exits = model.config.exit_layers
            want = final if d == 4 else per_exit[exits.index(d)]
            np.testing.assert_allclose(lg, want, atol=1e-3, rtol=1e-4)


def test_exit_option_errors(model):
    with pytest.raises(ValueError, match="unknown exit_measure"):
        models.generate(model, PROMPTS, max_new_tokens=2, exit_threshold=0.5, exit_measure="x")
    with pytest.raises(ValueError, match=r"\[0, 1\] for exit_measure='confidence'"):
        models.generate(model, PROMPTS, max_new_tokens=2, exit_threshold=1.5)
    with pytest.raises(ValueError, match="unknown exit_state"):
        models.generate(model, PROMPTS, max_new_tokens=2, exit_threshold=0.5, exit_state="x")
    dense = models.build(models.get_config("dense-tiny"))
    with pytest.raises(ValueError, match="needs a model with exits"):
        models.generate(dense, PROMPTS, max_new_tokens=2, exit_threshold=0.5)
    hybrid = models.get_config("mamba2-hybrid-tiny")
    hybrid = models.build(hybrid.replace(exit_layers=(1,)))
    with pytest.raises(ValueError, match="attention mixers only"):
        models.generate(hybrid, PROMPTS, max_new_tokens=2, exit_threshold=0.5)


def test_exit_measures():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]]) + 1e-30)
    np.testing.assert_allclose(early_exit.exit_score(logits, "confidence"), [0.5, 0.25], 1e-5)
    np.testing.assert_allclose(early_exit.exit_score(logits, "margin"), [0.2, 0.0], atol=1e-5)
    h = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2))
    np.testing.assert_allclose(
        early_exit.exit_score(logits, "entropy"), [1 - h / np.log(4), 0.0], atol=1e-5
    )
