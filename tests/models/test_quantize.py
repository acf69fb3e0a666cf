"""Post-training quantization: accuracy, structure, closed-form bytes, outliers, generation and
checkpoints (``models.quantize``)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels.quant as kq
import models
from models.layers import Einsum
from models.quantize import QuantizedEinsum, linear_layers

CFG = models.get_config("dense-tiny")
D, F, NH, KH = (
    CFG.d_model,
    CFG.ffn_dim,
    CFG.num_heads * CFG.head_dim,
    CFG.num_kv_heads * CFG.head_dim,
)
# (K, N) of each projection, from the config alone.
KN = {"q": (D, NH), "k": (D, KH), "v": (D, KH), "o": (NH, D), "up": (D, F), "gate": (D, F)}
KN["down"] = (F, D)


@pytest.fixture(scope="module")
def model():
    return models.build(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def float_logits(model, tokens):
    return model(tokens)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _kn(name):
    return KN[name.rsplit(".", 1)[1]]


def test_int8_close_to_float_and_every_einsum_replaced(model, tokens, float_logits):
    q = models.quantize(model, models.QuantRecipe("int8"))
    err = _rel(q(tokens), float_logits)
    assert 0 < err < 0.02
    layers = linear_layers(q)
    assert len(layers) == 7 * CFG.num_layers + 1
    for name, layer in layers.items():
        assert isinstance(layer, Einsum if name == "lm_head" else QuantizedEinsum), name
    assert isinstance(q.embed, models.layers.Embed)
    # The input model is untouched.
    assert all(isinstance(m, Einsum) for m in linear_layers(model).values())
    np.testing.assert_array_equal(model(tokens), float_logits)


@pytest.mark.parametrize(
    ("scheme", "group_size", "expected"),
    [
        ("int8", None, lambda K, N: K * N + 4 * N),
        ("fp8", None, lambda K, N: K * N + 4 * N),
        ("int4", 32, lambda K, N: -(-K // 2) * N + 4 * (K // 32) * N),
    ],
)
def test_param_bytes_closed_form(model, scheme, group_size, expected):
    q = models.quantize(model, models.QuantRecipe(scheme, group_size=group_size))
    before, after = models.layer_bytes(model), models.layer_bytes(q)
    quantized = [n for n in after if n != "lm_head"]
    for name in quantized:
        K, N = _kn(name)
        assert before[name] == 4 * K * N
        assert after[name] == expected(K, N), name
    ratio = sum(after[n] for n in quantized) / sum(before[n] for n in quantized)
    assert ratio < (0.3 if scheme != "int4" else 0.2)
    saved = sum(before[n] - after[n] for n in quantized)
    assert models.param_bytes(q) == models.param_bytes(model) - saved


def test_int4_group_and_w8a8_accuracy(model, tokens, float_logits):
    int4 = models.quantize(model, models.QuantRecipe("int4", group_size=32))
    w8a8 = models.quantize(model, models.QuantRecipe("int8", activations="int8"))
    fp8 = models.quantize(model, models.QuantRecipe("fp8", activations="fp8"))
    assert 0 < _rel(int4(tokens), float_logits) < 0.2
    assert 0 < _rel(w8a8(tokens), float_logits) < 0.03
    assert 0 < _rel(fp8(tokens), float_logits) < 0.08


def test_rules(model, tokens):
    recipe = models.QuantRecipe("int8", rules={"blocks.0.channel": None, "lm_head": "int4"})
    q = models.quantize(model, recipe)
    layers = linear_layers(q)
    for name, layer in layers.items():
        keep = name.startswith("blocks.0.channel.")
        assert isinstance(layer, Einsum if keep else QuantizedEinsum), name
    assert layers["lm_head"].scheme == "int4" and layers["blocks.1.mixer.q"].scheme == "int8"
    # The longest prefix wins.
    recipe = models.QuantRecipe(rules={"blocks.1": None, "blocks.1.mixer.o": "fp8"})
    assert recipe.scheme_for("blocks.1.mixer.o") == "fp8"
    assert recipe.scheme_for("blocks.1.mixer.q") is None
    assert recipe.scheme_for("blocks.10.mixer.q") == "int8"  # whole components only
    hash(recipe)


def test_errors_name_the_layer(model):
    with pytest.raises(ValueError, match=r"unknown scheme 'int3'; valid"):
        models.QuantRecipe("int3")
    with pytest.raises(ValueError, match=r"rule 'blocks\.0\.mlp'.*'int2'"):
        models.QuantRecipe(rules={"blocks.0.mlp": "int2"})
    with pytest.raises(ValueError, match=r"rule 'layers\.0\.mlp' matches no linear layer"):
        models.quantize(model, models.QuantRecipe(rules={"layers.0.mlp": None}))
    with pytest.raises(
        ValueError, match=r"layer 'blocks\.0\.channel\.gate' \(BTD,DF->BTF, K=64.*group_size=48"
    ):
        models.quantize(model, models.QuantRecipe("int8", group_size=48))
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.\w+\.\w+'.*activations='int8'"):
        models.quantize(model, models.QuantRecipe("int4", activations="int8"))


@pytest.mark.parametrize(
    ("equation", "shape", "axes", "x_shape", "bias_dims"),
    [
        ("BTD,DNH->BTNH", (16, 4, 8), ("embed", "heads", "head_dim"), (2, 3, 16), 2),
        ("BTNH,NHD->BTD", (4, 8, 16), ("heads", "head_dim", "embed"), (2, 3, 4, 8), 1),
        ("BTD,DF->BFT", (16, 24), ("embed", "mlp"), (2, 3, 16), 0),
    ],
)
def test_layer_equals_einsum_with_dequantized_kernel(equation, shape, axes, x_shape, bias_dims):
    layer = Einsum(equation, shape, axes, bias_dims=bias_dims, rngs=nnx.Rngs(0))
    bias = jax.random.normal(jax.random.key(2), shape[len(shape) - bias_dims :])
    if bias_dims:
        layer.bias[...] = bias
    q = QuantizedEinsum(layer, "int4", group_size=8)
    x = jax.random.normal(jax.random.key(3), x_shape)
    K, N = q.shape
    # Oracle: the kernel quantized by hand as [K, N] and applied by the float einsum.
    lhs, rest = equation.split(",")
    rhs = rest.split("->")[0]
    contract = [c for c in rhs if c in lhs]
    perm = [rhs.index(c) for c in contract + [c for c in rhs if c not in lhs]]
    w_KN = jnp.transpose(layer.kernel[...], perm).reshape(K, N)
    w_deq = kq.dequantize(kq.quantize(w_KN, "int4", group_size=8))
    w_deq = jnp.transpose(w_deq.reshape([shape[i] for i in perm]), np.argsort(perm))
    expected = jnp.einsum(equation, x, w_deq) + (bias if bias_dims else 0.0)
    np.testing.assert_allclose(q(x), expected, rtol=1e-5, atol=1e-5)
    assert q.values.get_metadata()["out_sharding"] == (axes[perm[0]], axes[perm[len(contract)]])


def test_all_outlier_channels_equal_float(model, tokens, float_logits):
    q = models.quantize(model, models.QuantRecipe("int4", group_size=32, outlier_channels=F))
    np.testing.assert_allclose(q(tokens), float_logits, rtol=1e-6, atol=1e-6)


def _planted_layer():
    layer = Einsum("BTD,DF->BTF", (64, 32), ("embed", "mlp"), rngs=nnx.Rngs(0))
    layer.kernel[...] = layer.kernel[...].at[jnp.array([5, 40])].multiply(50.0)
    return layer


def test_outlier_channels_reduce_error_on_planted_rows():
    layer = _planted_layer()
    x = jax.random.normal(jax.random.key(4), (2, 8, 64))
    y = layer(x)
    errs = {k: _rel(QuantizedEinsum(layer, "int4", outliers=k)(x), y) for k in (0, 2)}
    q = QuantizedEinsum(layer, "int4", outliers=2)
    np.testing.assert_array_equal(q.outlier_idx[...], [5, 40])
    assert errs[2] < errs[0] / 5


def test_calibration_picks_activation_outliers(model, tokens):
    stats = models.calibrate(model, tokens)
    assert set(stats) == set(linear_layers(model))
    assert stats["blocks.0.channel.down"].shape == (F,) and stats["blocks.0.mixer.o"].shape == (NH,)
    x = jnp.ones((1, 4, 64)).at[..., 7].set(1000.0)
    layer = Einsum("BTD,DF->BTF", (64, 32), ("embed", "mlp"), rngs=nnx.Rngs(0))
    absmax = jnp.max(jnp.abs(x), axis=(0, 1))
    q = QuantizedEinsum(layer, "int4", outliers=1, act_absmax=absmax)
    assert int(q.outlier_idx[0]) == 7
    qm = models.quantize(model, models.QuantRecipe(outlier_channels=2), act_absmax=stats)
    assert qm.blocks[0].channel.down.outlier_idx.shape == (2,)


def test_generate_matches_greedy_full_forward(model):
    q = models.quantize(model, models.QuantRecipe("int4", group_size=32, outlier_channels=2))
    prompts, steps = [[3, 14, 15, 92, 65], [35, 89]], 4
    out = models.generate(q, prompts, max_new_tokens=steps)
    # Oracle: greedy decoding by full causal forwards of a fixed padded length (one compile);
    # padding after a sequence does not change the logits at its last token.
    graphdef, state = nnx.split(q)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        tokens = np.zeros((len(seqs), 5 + steps), np.int32)
        for i, seq in enumerate(seqs):
            tokens[i, : len(seq)] = seq
        logits = forward(state, jnp.asarray(tokens))
        for i, seq in enumerate(seqs):
            seq.append(int(jnp.argmax(logits[i, len(seq) - 1])))
    assert out.tokens == [seq[len(p) :] for seq, p in zip(seqs, prompts, strict=True)]


def test_save_load_round_trip(model, tokens, tmp_path):
    recipe = models.QuantRecipe(
        "int4", group_size=32, outlier_channels=2, rules={"blocks.1": "fp8", "lm_head": "int8"}
    )
    q = models.quantize(model, recipe)
    models.save_quantized(q, tmp_path / "q")
    loaded = models.load_quantized(tmp_path / "q")
    np.testing.assert_array_equal(loaded(tokens), q(tokens))
    assert loaded.blocks[1].mixer.q.values[...].dtype == jnp.float8_e4m3fn
    assert loaded.blocks[0].mixer.q.values[...].dtype == jnp.uint8
    assert models.param_bytes(loaded) == models.param_bytes(q)
    with pytest.raises(FileExistsError, match="already exists"):
        models.save_quantized(q, tmp_path / "q")
    shutil.rmtree(tmp_path / "q" / "state" / "d")  # the array data
    (tmp_path / "q" / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(ValueError, match=f"cannot read quantized checkpoint {tmp_path / 'q'}: "):
        models.load_quantized(tmp_path / "q")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"no quantized checkpoint directory at .*{tmp_path}"
    ):
        models.load_quantized(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="bad is not a quantized checkpoint"):
        models.load_quantized(tmp_path / "bad")
    (tmp_path / "bad" / "state").mkdir()
    (tmp_path / "bad" / "quantization.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad .*quantization\.json: JSONDecodeError"):
        models.load_quantized(tmp_path / "bad")


def test_moe_routers_stay_float_unless_a_rule_names_them():
    moe = models.build(models.get_config("moe-tiny"), seed=0)
    q = models.quantize(moe, models.QuantRecipe("int8"))
    assert type(q.blocks[0].channel.router).__name__ == "Einsum"
    assert type(q.blocks[0].mixer.q).__name__ == "QuantizedEinsum"
    named = models.quantize(
        moe, models.QuantRecipe("int8", rules={"blocks.1.channel.router": "int8"})
    )
    assert type(named.blocks[1].channel.router).__name__ == "QuantizedEinsum"
    assert type(named.blocks[0].channel.router).__name__ == "Einsum"
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    want, got = moe(tokens).logits, q(tokens).logits
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))
