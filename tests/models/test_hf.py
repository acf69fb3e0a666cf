"""Hugging Face import/export against tiny random transformers models built here (CPU torch).

Every model has randomised weights (HF initialises biases to 0 and norm weights to 1, which
would hide bias and norm bugs) and eager attention (so sliding windows are honoured).
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import models
from models import hf
from models.hf import safetensors as st
from models.layers import rope_frequencies

TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=128,
    intermediate_size=96,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # Wavelengths 6.3 .. 6e4 against a band of (4, 16): every regime of the scaling is used.
    original_max_position_embeddings=16,
)
CASES = {
    "llama_gqa": (transformers.LlamaConfig, {}),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=8)),
    # Window on layer 1 only (max_window_layers=1), q/k/v biases.
    "qwen2_bias_window": (
        transformers.Qwen2Config,
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
    "llama3_rope_tied_bias": (
        transformers.LlamaConfig,
        dict(
            rope_parameters=LLAMA3_ROPE,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
}
# What makes each case special, undone in config.json to show the feature changes the logits.
DISABLE = {
    "mistral_window": dict(sliding_window=None),
    "qwen2_bias_window": dict(layer_types=["full_attention"] * 2),
    "llama3_rope_tied_bias": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
}
ATOL = 1e-4


def _hf_model(name, seed=0, **overrides):
    config_cls, extra = CASES[name]
    config = config_cls(**TINY, **extra, **overrides, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if pname.endswith("norm.weight") else 0.2 * noise)
    return model


def _tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def _ours(model, tokens):
    return np.asarray(model(jnp.asarray(tokens, jnp.int32)))


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name)`` -> (HF model, directory written by HF ``save_pretrained``), cached."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = model, str(path)
        return cache[name]

    return get


@pytest.fixture
def llama_copy(saved, tmp_path):
    return shutil.copytree(saved("llama_gqa")[1], tmp_path / "ckpt")


# --- safetensors ---------------------------------------------------------------------------


def _all_dtypes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    return {
        "f32": x.astype(np.float32),
        "f16": x.astype(np.float16),
        "bf16": x.astype(ml_dtypes.bfloat16),
        "f64": x,
        "i64": rng.integers(-(2**40), 2**40, (4,)),
        "i32": rng.integers(-(2**30), 2**30, (2, 2)).astype(np.int32),
        "i8": rng.integers(-128, 127, (7,)).astype(np.int8),
        "u8": rng.integers(0, 255, (1, 7)).astype(np.uint8),
        "bool": rng.random((3, 1)) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_safetensors_round_trip_against_reference_library(tmp_path):
    tensors = _all_dtypes()
    st.save_file(tensors, tmp_path / "ours.safetensors", {"format": "pt"})
    safetensors.numpy.save_file(tensors, str(tmp_path / "ref.safetensors"), {"format": "pt"})
    theirs = safetensors.numpy.load_file(str(tmp_path / "ours.safetensors"))
    ours = st.SafetensorsFile(tmp_path / "ref.safetensors")
    assert ours.metadata == {"format": "pt"}
    assert sorted(ours) == sorted(tensors)
    for name, want in tensors.items():
        for got in (theirs[name], ours[name], st.load_file(tmp_path / "ours.safetensors")[name]):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want)
    assert ours["f32"].base is not None  # a view of the memory map, not a copy


def test_safetensors_sharded_checkpoint(tmp_path):
    tensors = {f"t{i}": np.full((64,), i, np.float32) for i in range(5)}
    files = st.save_checkpoint(tensors, tmp_path, max_shard_bytes=600)
    assert files[-1] == st.INDEX_FILE and len(files) == 4  # 3 shards of <= 2 tensors
    ckpt = st.Checkpoint(tmp_path)
    assert sorted(ckpt) == sorted(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(ckpt[name], want)
    st.save_checkpoint(tensors, tmp_path)  # rewriting as one file removes the stale shards
    assert sorted(os.listdir(tmp_path)) == [st.SINGLE_FILE]


def _write_raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("missing", FileNotFoundError, "not found"),
        ("no_length", ValueError, "truncated"),
        ("header_past_end", ValueError, "truncated"),
        ("data_past_end", ValueError, "truncated"),
        ("bad_json", ValueError, "malformed"),
        ("unknown_dtype", ValueError, "unknown dtype 'F7'"),
        ("wrong_size", ValueError, "needs 16"),
    ],
)
def test_safetensors_errors_name_the_file(tmp_path, case, error, match):
    path = tmp_path / "x.safetensors"
    entry = lambda dtype, end: json.dumps(
        {"w": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, end]}}
    ).encode()
    if case == "no_length":
        path.write_bytes(b"\x01\x02")
    elif case == "header_past_end":
        path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    elif case == "data_past_end":
        st.save_file({"w": np.ones((2, 2), np.float32)}, path)
        path.write_bytes(path.read_bytes()[:-4])
    elif case == "bad_json":
        _write_raw(path, b'{"w": [', b"")
    elif case == "unknown_dtype":
        _write_raw(path, entry("F7", 16), bytes(16))
    elif case == "wrong_size":
        _write_raw(path, entry("F32", 8), bytes(16))
    with pytest.raises(error, match=match) as info:
        st.SafetensorsFile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# --- config mapping ------------------------------------------------------------------------

CONFIG_CASES = {
    "llama_legacy_rope": dict(
        model_type="llama",
        rope_theta=5e5,
        rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    ),
    "llama_legacy_type_key": dict(
        model_type="llama",
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    ),
    "llama_new_rope": dict(model_type="llama", rope_parameters=LLAMA3_ROPE),
    "mistral_window": dict(model_type="mistral", sliding_window=8),
    "mistral_no_window": dict(model_type="mistral", sliding_window=None),
    "mistral_default_window": dict(model_type="mistral"),
    "qwen2_off": dict(model_type="qwen2", sliding_window=8),
    "qwen2_max_window_layers": dict(
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        num_hidden_layers=4,
    ),
    "qwen2_layer_types": dict(
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=8,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_config_from_hf_matches_transformers(name):
    """Windows per layer and RoPE frequencies agree with what transformers builds."""
    raw = {**TINY, **CONFIG_CASES[name]}
    ref = transformers.AutoConfig.for_model(**json.loads(json.dumps(raw)))
    ours = hf.config_from_hf(raw)
    layers = range(ref.num_hidden_layers)
    if ref.model_type == "llama":
        want = [None for _ in layers]
    elif ref.model_type == "mistral":
        want = [ref.sliding_window for _ in layers]
    else:
        want = [ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types]
    assert [ours.window(i) for i in layers] == want
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(ref)
    np.testing.assert_allclose(
        np.asarray(rope_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling)),
        rotary.inv_freq.numpy(),
        rtol=1e-6,
    )
    assert hf.config_from_hf(hf.config_to_hf(ours)).replace(name="x") == ours.replace(name="x")


# --- load: logits equal transformers' -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_matches_transformers(saved, name, tmp_path):
    ref_model, path = saved(name)
    tokens = _tokens()
    want = _hf_logits(ref_model, tokens)
    model = hf.load_pretrained(path)
    assert isinstance(model, models.LM) and model.config.hf_architecture == type(ref_model).__name__
    got = _ours(model, tokens)
    assert got.dtype == np.float32 and got.shape == (2, 24, TINY["vocab_size"])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    if name in DISABLE:  # the feature under test is live at this length
        edited = shutil.copytree(path, tmp_path / "edited")
        _edit_config(edited, **DISABLE[name])
        assert np.abs(_ours(hf.load_pretrained(edited), tokens) - want).max() > 1e-2


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_round_trip_through_transformers(saved, name, tmp_path):
    """HF -> load_pretrained -> save_pretrained -> AutoModelForCausalLM: identical logits."""
    ref_model, path = saved(name)
    hf.save_pretrained(hf.load_pretrained(path), tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(again) is type(ref_model)
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert head_dim(again.config) == head_dim(ref_model.config)
    for key in (
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "num_key_value_heads",
        "rms_norm_eps",
    ):
        assert getattr(again.config, key, None) == getattr(ref_model.config, key, None), key
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(
        _hf_logits(again, tokens), _hf_logits(ref_model, tokens), atol=1e-5, rtol=0
    )


def test_save_native_model_loads_in_transformers(tmp_path):
    """A Kestrel-built model (Qwen2 layout, window on layer 1) exported in 3 shards."""
    cfg = models.get_config(
        "dense-tiny",
        qkv_bias=True,
        sliding_window=5,
        sliding_window_layers=(1,),
        hf_architecture=None,
    )
    model = models.build(cfg, seed=1)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(2)  # biases and norm scales too: they start at 0 and 1
    nnx.update(
        model, jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape, np.float32), params)
    )
    hf.save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    assert os.path.exists(tmp_path / st.INDEX_FILE)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(ref).__name__ == "Qwen2ForCausalLM" and ref.config.layer_types == [
        "full_attention",
        "sliding_attention",
    ]
    tokens = _tokens(seed=2) % cfg.vocab_size
    np.testing.assert_allclose(_hf_logits(ref, tokens), _ours(model, tokens), atol=ATOL, rtol=0)
    back, want = (
        jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (hf.load_pretrained(tmp_path), model)
    )
    for a, b in zip(back, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_sharded_transformers_checkpoint(tmp_path):
    ref = _hf_model("qwen2_bias_window", seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / st.INDEX_FILE)
    tokens = _tokens(seed=3)
    got = _ours(hf.load_pretrained(tmp_path), tokens)
    np.testing.assert_allclose(got, _hf_logits(ref, tokens), atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_and_compute(tmp_path):
    ref = _hf_model("llama_gqa", seed=4)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # float32 model holding bfloat16 values
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path)
    assert hf.read_config(tmp_path)["dtype"] == "bfloat16"
    tokens = _tokens(seed=4)
    want = _hf_logits(ref, tokens)
    np.testing.assert_allclose(_ours(hf.load_pretrained(tmp_path), tokens), want, atol=ATOL)
    low = hf.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(low, nnx.Param))} == {
        jnp.dtype(jnp.bfloat16)
    }
    assert low.config.dtype == "bfloat16"
    # bfloat16 compute is as accurate as transformers' own (its RoPE buffer kept float32).
    ref_low = copy.deepcopy(ref).to(torch.bfloat16)
    ref_low.model.rotary_emb.inv_freq = ref.model.rotary_emb.inv_freq
    ref_err = np.abs(_hf_logits(ref_low, tokens) - want).max()
    assert np.abs(_ours(low, tokens) - want).max() < 1.5 * ref_err


# --- errors --------------------------------------------------------------------------------


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found") as info:
        hf.load_pretrained(tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(info)


def test_missing_config(llama_copy):
    os.remove(llama_copy / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.load_pretrained(llama_copy)


def test_missing_safetensors(llama_copy):
    os.remove(llama_copy / st.SINGLE_FILE)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        hf.load_pretrained(llama_copy)


def test_truncated_safetensors(llama_copy):
    path = llama_copy / st.SINGLE_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(hf.SafetensorsError, match="truncated") as info:
        hf.load_pretrained(llama_copy)
    assert str(path) in _one_line(info)


def test_unsupported_architecture(llama_copy):
    _edit_config(llama_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(hf.ConversionError, match="GPT2LMHeadModel") as info:
        hf.load_pretrained(llama_copy)
    assert all(a in _one_line(info) for a in hf.SUPPORTED_ARCHITECTURES)


def test_missing_tensor(llama_copy):
    path = llama_copy / st.SINGLE_FILE
    tensors = st.load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    st.save_file(tensors, path)
    with pytest.raises(hf.ConversionError, match="'model.layers.1.mlp.down_proj.weight' missing"):
        hf.load_pretrained(llama_copy)


def test_shape_mismatch(llama_copy):
    _edit_config(llama_copy, intermediate_size=100)
    with pytest.raises(
        hf.ConversionError,
        match=r"gate_proj.weight' has shape \[96, 64\], "
        r"config.json implies \[100, 64\]",
    ):
        hf.load_pretrained(llama_copy)


def test_tensors_the_config_does_not_describe(saved, tmp_path):
    """Qwen2's q/k/v biases under a Llama config without attention_bias."""
    edited = shutil.copytree(saved("qwen2_bias_window")[1], tmp_path / "edited")
    _edit_config(edited, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(hf.ConversionError, match="not described by config.json"):
        hf.load_pretrained(edited)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            "unsupported rope_type 'yarn'",
        ),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    ],
)
def test_unsupported_features(llama_copy, change, match):
    _edit_config(llama_copy, **change)
    with pytest.raises(hf.ConversionError, match=match):
        hf.load_pretrained(llama_copy)


def test_save_rejects_what_the_architecture_cannot_express(tmp_path):
    model = models.build(models.get_config("dense-tiny", sliding_window=4))
    with pytest.raises(hf.ConversionError, match="LlamaForCausalLM: no sliding window"):
        hf.save_pretrained(model, tmp_path)


# --- generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_generation_matches_transformers(saved, name):
    """Ragged batch (5, 11, 17 tokens), 32 greedy tokens, equal to HF ``generate`` per prompt.

    With Mistral's window 8 the cached decode must honour the window as HF's does.
    """
    ref_model, path = saved(name)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (5, 11, 17)]
    out = models.generate(hf.load_pretrained(path), prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, out.tokens, strict=True):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            # An explicit mask: HF otherwise masks prompt tokens equal to pad_token_id.
            want = ref_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert len(want) == 32
        assert got == want
