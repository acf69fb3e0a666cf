"""Layer dropping (``models.prune``): pruned models equal a forward that skips the blocks, Block
Influence equals a numpy computation on captured hidden states, SLEB equals brute force."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.lm import Block
from models.prune import block_influence, drop_layers, prune, pruned_config
from models.state import Segment

ATOL = 1e-5
CONFIGS = {
    # per-layer windows: sliding_window_layers (1, 3) must follow layer 3 to its new index
    "dense": models.get_config(
        "dense-tiny", num_layers=4, sliding_window=4, sliding_window_layers=(1, 3)
    ),
    # hybrid: mamba2, mamba2, attention, mamba2 (the pattern repeats from layer 3 on)
    "hybrid": models.get_config("mamba2-hybrid-tiny", num_layers=4),
}
DROP = {"dense": [2, 1], "hybrid": [1]}


# Every model is built once and every input is [2, 12]: eager ops compile once per shape.
@pytest.fixture(scope="module")
def built():
    return {name: models.build(cfg, seed=1) for name, cfg in CONFIGS.items()}


def _tokens(B=2, T=12, seed=0, vocab=264):
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


def _skip_forward(model, tokens_BT, kept):
    """The oracle: the original model's embedding, its kept blocks in order, norm and head."""
    x_BTD = model.embed(tokens_BT) * model.config.embed_scale
    segment = Segment.full(*tokens_BT.shape)
    for i in kept:
        x_BTD, _, _ = model.blocks[i](x_BTD, segment, None)
    return model.logits(model.final_norm(x_BTD))


def _perplexity(logits_BTV, tokens_BT):
    logits = np.asarray(logits_BTV, np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens_BT[:, 1:, None], -1)
    return float(np.exp(nll.mean()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dropped_model_equals_forward_skipping_the_blocks(built, name):
    cfg, model, drop = CONFIGS[name], built[name], DROP[name]
    pruned = drop_layers(model, drop)
    kept = [i for i in range(cfg.num_layers) if i not in drop]
    new = pruned.config
    assert new.num_layers == len(kept) == len(pruned.blocks)
    for j, i in enumerate(kept):
        assert (new.mixer(j), new.channel(j), new.window(j)) == (
            cfg.mixer(i),
            cfg.channel(i),
            cfg.window(i),
        )
    if name == "dense":
        assert new.sliding_window_layers == (1,)  # old layer 3 is new layer 1
    tokens = jnp.asarray(_tokens())
    np.testing.assert_allclose(pruned(tokens), _skip_forward(model, tokens, kept), atol=ATOL)
    # copied, not shared: updating the pruned model leaves the original alone
    src, dst = model.blocks[kept[-1]].mixer_norm.scale, pruned.blocks[-1].mixer_norm.scale
    np.testing.assert_array_equal(src[...], dst[...])
    dst[...] = dst[...] + 1.0
    assert not np.array_equal(src[...], dst[...])


def test_cached_decode_of_pruned_model_equals_full_forward(built):
    pruned = drop_layers(built["hybrid"], DROP["hybrid"])  # mamba2, attention, mamba2
    tokens = _tokens(seed=3)
    full = np.asarray(pruned(jnp.asarray(tokens)))
    step = nnx.jit(lambda m, t, s: m.step(t, s))
    state = pruned.init_state(2, 16)
    logits, state = step(pruned, jnp.asarray(tokens[:, :9]), state)
    np.testing.assert_allclose(logits, full[:, :9], atol=ATOL)
    for t in range(9, 12):
        logits, state = step(pruned, jnp.asarray(tokens[:, t : t + 1]), state)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=ATOL)


def test_block_influence_equals_numpy_on_captured_hidden_states(built, monkeypatch):
    model, tokens = built["hybrid"], _tokens(seed=5)
    streams = []  # (input, output) of every block call, captured around Block.__call__
    call = Block.__call__

    def capture(self, x_BTD, segment, state=None):
        out = call(self, x_BTD, segment, state)
        streams.append((np.asarray(x_BTD, np.float64), np.asarray(out[0], np.float64)))
        return out

    with monkeypatch.context() as patch:
        patch.setattr(Block, "__call__", capture)
        model(jnp.asarray(tokens))
    assert len(streams) == 4
    want = []
    for x, y in streams:
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        want.append(1.0 - cos.mean())
    np.testing.assert_allclose(block_influence(model, tokens), want, atol=1e-6)
    np.testing.assert_allclose(block_influence(model, tokens, batch_size=1), want, atol=1e-6)


def _greedy_tokens(model, B=2, T=12, seed=0):
    """Calibration text the model itself predicts greedily: removing a block that changes the
    residual stream makes it less likely, so only an identity block leaves perplexity as is."""
    tokens = np.zeros((B, T), np.int32)
    tokens[:, 0] = np.random.default_rng(seed).integers(0, model.config.vocab_size, B)
    for t in range(1, T):  # causal: the zeros after position t do not change logits at t - 1
        tokens[:, t] = np.asarray(model(jnp.asarray(tokens))[:, t - 1].argmax(-1))
    return tokens


def test_an_identity_block_has_zero_influence_and_is_dropped(built):
    model = drop_layers(built["dense"], [])  # a copy
    block = model.blocks[2]
    for einsum in (block.mixer.o, block.channel.down):  # block 2 now returns its input
        einsum.kernel[...] = jnp.zeros_like(einsum.kernel[...])
    tokens = _greedy_tokens(model)
    bi = block_influence(model, tokens)
    assert abs(bi[2]) < 1e-6 and np.delete(bi, 2).min() > 1e-3
    for method in ("block_influence", "sleb"):
        pruned, report = prune(model, tokens, num_drop=1, method=method, progress=False)
        assert report.dropped == (2,) and report.kept == (0, 1, 3)
        assert pruned.config.num_layers == 3
        np.testing.assert_allclose(report.perplexity_after, report.perplexity_before, rtol=1e-5)
    np.testing.assert_allclose(pruned(jnp.asarray(tokens)), model(jnp.asarray(tokens)), atol=ATOL)


def test_sleb_equals_brute_force_over_single_removals(built):
    model, tokens = built["dense"], _tokens(seed=7)
    stream = io.StringIO()
    stream.isatty = lambda: False
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stderr", stream)
        pruned, report = prune(model, tokens, num_drop=2, method="sleb")
    assert "sleb 7/7 100%" in stream.getvalue()  # progress over 4 + 3 candidate evaluations

    current, layers, dropped, ppls = model, list(range(4)), [], []
    for round_ in range(2):
        scores = [
            _perplexity(drop_layers(current, [j])(jnp.asarray(tokens)), tokens)
            for j in range(len(layers))
        ]
        best = int(np.argmin(scores))
        dropped.append(layers.pop(best))
        ppls.append(scores[best])
        if round_ == 0:
            np.testing.assert_allclose(report.scores, scores, rtol=1e-5)
        current = drop_layers(current, [best])
    assert report.dropped == tuple(dropped)
    assert report.kept == tuple(layers)
    np.testing.assert_allclose(report.step_perplexities, ppls, rtol=1e-5)
    before = _perplexity(model(jnp.asarray(tokens)), tokens)
    np.testing.assert_allclose(report.perplexity_before, before, rtol=1e-5)
    np.testing.assert_allclose(pruned(jnp.asarray(tokens)), current(jnp.asarray(tokens)), atol=ATOL)


def test_pruned_config_keeps_each_layers_kind():
    cfg = models.get_config("griffin-tiny", num_layers=7, sliding_window_layers=(2, 5, 6))
    new = pruned_config(cfg, [0, 5])  # kept 1..4 and 6: rglru, local, rglru, rglru, rglru
    want = ("rglru", "local_attention", "rglru", "rglru", "rglru")
    assert tuple(new.mixer(j) for j in range(5)) == want
    assert new.sliding_window_layers == (1, 4)  # layers 2 and 6, renumbered
    assert new.num_layers == 5 and new.name == "griffin-tiny-5of7-layers"
    assert pruned_config(cfg, []) == cfg


@pytest.mark.parametrize(
    "drop, exits, weights",
    [
        ([1], (1,), (0.2, 1.0)),  # the exit after block 1 goes with it
        ([0], (1,), (0.3, 1.0)),  # the exit after block 1 now follows the first block
        ([2, 3], (1,), (0.2, 1.0)),  # the exit after block 1 would be the final head
        ([3], (1, 2), (0.2, 0.3, 1.0)),
    ],
)
def test_exits_follow_their_blocks(drop, exits, weights):
    cfg = models.get_config("early-exit-tiny", exit_loss_weights=(0.2, 0.3, 1.0))
    assert cfg.exit_layers == (1, 2)
    new = pruned_config(cfg, drop)
    assert (new.exit_layers, new.exit_loss_weights) == (exits, weights)


def test_dropped_exit_model_keeps_its_exit_heads():
    cfg = models.get_config("early-exit-tiny", exit_head="separate")
    model, tokens = models.build(cfg, seed=2), jnp.asarray(_tokens(seed=8))
    pruned = drop_layers(model, [0])  # exit 1 (after block 1) becomes exit 0 (after block 0)
    out = pruned(tokens)
    assert out.exit_logits.shape[0] == 1
    np.testing.assert_allclose(out.logits, _skip_forward(model, tokens, [1, 2, 3]), atol=ATOL)
    x_BTD = model.embed(tokens)
    x_BTD, _, _ = model.blocks[1](x_BTD, Segment.full(2, 12), None)
    want = model.exits.heads[1](model.exits.norms[1](x_BTD))
    np.testing.assert_allclose(out.exit_logits[0], want, atol=ATOL)


def test_bad_requests_name_the_problem(built):
    model, tokens = built["dense"], _tokens()
    for layers, error, match in [
        ([0, 1, 2, 3], ValueError, "dropping all 4 layers"),
        ([1, 1], ValueError, r"layers \[1\] listed more than once"),
        ([4, -1], ValueError, r"layers \[-1, 4\] outside 0..3"),
        (1, TypeError, "sequence of layer indices"),
        ([1.0], TypeError, "must be integers"),
    ]:
        with pytest.raises(error, match=match):
            drop_layers(model, layers)
    for kw, error, match in [
        (dict(num_drop=4), ValueError, r"num_drop=4 must be in 1..3"),
        (dict(num_drop=0), ValueError, r"num_drop=0 must be in 1..3"),
        (dict(num_drop=1, method="magnitude"), ValueError, "unknown pruning method 'magnitude'"),
    ]:
        with pytest.raises(error, match=match):
            prune(model, tokens, **kw)
    for bad, error, match in [
        (tokens[0], ValueError, r"must be \[B, T\]"),
        (tokens.astype(np.float32), TypeError, "integer ids"),
        (tokens + 200, ValueError, "outside the vocab 0..263"),
        (tokens - 300, ValueError, "outside the vocab"),
        (tokens[:, :1], ValueError, "T >= 2"),
    ]:
        with pytest.raises(error, match=match):
            prune(model, bad, num_drop=1)
    with pytest.raises(ValueError, match="outside the vocab"):
        block_influence(model, jnp.full((1, 4), 264))
    with pytest.raises(TypeError, match="expected a models.LM"):
        block_influence(object(), tokens)
