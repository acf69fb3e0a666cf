"""Tests for experiments.tokenizer and experiments.data against independent oracles: Python's
own UTF-8 codec, files read back byte by byte, naive scans over synthetic sequences, and the
closed-form power-law slot distribution of MQAR."""

import dataclasses
import pathlib
import sysconfig

import numpy as np
import pytest

from experiments import data
from experiments.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer

TEXT = "héllo wörld — 日本語 🙂\n\ttabs"


def _contains(haystack_N: np.ndarray, needle_T: np.ndarray) -> bool:
    """Whether ``needle_T`` is a contiguous run of ``haystack_N`` (byte search, aligned)."""
    hay = haystack_N.astype("<u2").tobytes()
    needle = needle_T.astype("<u2").tobytes()
    start = hay.find(needle)
    while start != -1 and start % 2:
        start = hay.find(needle, start + 1)
    return start != -1


def _doc_tokens(raw: bytes) -> list[int]:
    return [BOS, *raw, EOS]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_constants():
    tok = ByteTokenizer()
    assert (tok.BOS, tok.EOS, tok.PAD, tok.vocab_size) == (256, 257, 258, 259)
    assert (BOS, EOS, PAD, VOCAB_SIZE) == (256, 257, 258, 259)


def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == [BOS, *TEXT.encode("utf-8")]
    assert tok.encode(TEXT, bos=False, eos=True) == [*TEXT.encode("utf-8"), EOS]
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, ""]) == [ids, [BOS]]


def test_tokenizer_decode_skips_specials_and_padded_vocab():
    tok = ByteTokenizer()
    ids = [BOS, *b"ab", EOS, PAD, 259, 1000, *b"c"]
    assert tok.decode(ids) == "abc"
    assert tok.decode(np.array(ids, np.int32)) == "abc"
    # A multi-byte character cut in half is replaced, not an error.
    assert tok.decode(list("é".encode())[:1] + [ord("x")]) == "\ufffdx"


# ----------------------------------------------------------------------------- stdlib corpus


def test_stdlib_split_disjoint_deterministic_and_about_five_percent():
    train = data.stdlib_files("train")
    valid = data.stdlib_files("validation")
    assert train == data.stdlib_files("train") and valid == data.stdlib_files("validation")
    assert train == tuple(sorted(train)) and not set(train) & set(valid)
    assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.09
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    for relpath in train + valid:
        assert relpath.endswith(".py") and not excluded & set(relpath.split("/")[:-1])


def test_known_file_lands_in_exactly_one_split():
    relpath = "json/__init__.py"
    in_train = relpath in data.stdlib_files("train")
    in_valid = relpath in data.stdlib_files("validation")
    assert in_train != in_valid
    assert in_valid == data.is_validation(relpath)
    raw = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / relpath).read_bytes()
    split = "validation" if in_valid else "train"
    assert _contains(data.load_stdlib(split), np.array(_doc_tokens(raw)))


def test_stdlib_validation_tokens_match_files():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    expected = []
    for relpath in data.stdlib_files("validation"):
        expected += _doc_tokens((root / relpath).read_bytes())
    tokens_N = data.load_stdlib("validation")
    assert tokens_N.dtype == np.uint16
    np.testing.assert_array_equal(tokens_N, np.array(expected))
    assert data.load_stdlib("validation") is tokens_N  # cached


def test_stdlib_max_bytes_caps_source_bytes():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    raw = b"".join((root / p).read_bytes() for p in data.stdlib_files("train")[:20])
    tokens_N = data.load_stdlib("train", max_bytes=5000)
    body = tokens_N[tokens_N < 256]
    assert body.size == 5000 and bytes(body.astype(np.uint8)) == raw[:5000]
    assert tokens_N[0] == BOS and tokens_N[-1] == EOS


# ----------------------------------------------------------------------------- glob loader


def test_text_files_split_and_tokens(tmp_path):
    texts = {f"sub/doc{i:03d}.txt": f"{TEXT} #{i}\n" for i in range(200)}
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    pattern = str(tmp_path / "**" / "*.txt")
    tok = ByteTokenizer()
    for split in data.SPLITS:
        want = split == "validation"
        expected = []
        for name in sorted(texts):
            if data.is_validation(name) == want:
                expected += tok.encode(texts[name], eos=True)
        assert expected, split
        np.testing.assert_array_equal(data.load_text_files(pattern, split), expected)


def test_text_files_no_match_names_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(ValueError, match="nothing-"):
        data.load_text_files(pattern, "train")


# ----------------------------------------------------------------------------- corpus batches


def test_corpus_batches_deterministic_shifted_and_from_train():
    cfg = data.DataConfig(kind="stdlib", seq_len=32, batch_size=4, seed=3)
    ds = data.make_dataset(cfg)
    assert ds.vocab_size == VOCAB_SIZE and not ds.has_accuracy
    b5 = ds.batch(5)
    # Resume property: batch 5 of a fresh dataset, after other steps, is the same batch.
    for step in range(5):
        ds.batch(step)
    again = data.make_dataset(cfg).batch(5)
    for key in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(b5[key], ds.batch(5)[key])
        np.testing.assert_array_equal(b5[key], again[key])
    assert b5["inputs"].dtype == np.int32 and b5["targets"].dtype == np.int32
    assert b5["mask"].dtype == np.float32 and b5["inputs"].shape == (4, 32)
    np.testing.assert_array_equal(b5["mask"], 1.0)
    np.testing.assert_array_equal(b5["inputs"][:, 1:], b5["targets"][:, :-1])
    assert not np.array_equal(b5["inputs"], ds.batch(6)["inputs"])
    other_seed = data.make_dataset(dataclasses.replace(cfg, seed=4)).batch(5)
    assert not np.array_equal(b5["inputs"], other_seed["inputs"])
    train_N = data.load_stdlib("train")
    for row_in, row_tg in zip(b5["inputs"], b5["targets"], strict=True):
        assert _contains(train_N, np.concatenate([row_in, row_tg[-1:]]))


def test_corpus_eval_batches_fixed_and_from_validation():
    ds = data.make_dataset(data.DataConfig(kind="stdlib", seq_len=64, batch_size=2))
    first, second = ds.eval_batches(3), ds.eval_batches(3)
    assert len(first) == 3
    valid_N = data.load_stdlib("validation")
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
        for row_in, row_tg in zip(a["inputs"], a["targets"], strict=True):
            assert _contains(valid_N, np.concatenate([row_in, row_tg[-1:]]))


# ----------------------------------------------------------------------------- synthetic tasks


def test_mqar_targets_match_naive_scan():
    V, P, T = 64, 6, 48
    batch = data.mqar(
        np.random.default_rng(0), batch_size=64, seq_len=T, vocab_size=V, num_kv_pairs=P
    )
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
    assert inputs.shape == targets.shape == mask.shape == (64, T)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    assert inputs.min() >= 1 and inputs.max() < V  # id 0 reserved
    for row_in, row_tg, row_mask in zip(inputs, targets, mask, strict=True):
        keys, values = row_in[0 : 2 * P : 2], row_in[1 : 2 * P : 2]
        assert len(set(keys)) == P and len(set(values)) == P
        assert keys.max() < V // 2 <= values.min()
        queried = []
        for pos in np.flatnonzero(row_mask):
            key = row_in[pos]
            first = next(j for j in range(pos) if row_in[j] == key)  # earliest occurrence
            assert first < 2 * P and first % 2 == 0
            assert row_tg[pos] == row_in[first + 1]
            queried.append(key)
        assert sorted(queried) == sorted(keys)  # every key queried exactly once
        assert set(np.unique(row_mask)) == {0.0, 1.0}


def test_mqar_slot_distribution_is_power_law():
    # With one pair, the query slot g is drawn with probability ∝ (g + 1) ** (a - 1).
    T, a, B = 12, 0.3, 40_000
    batch = data.mqar(
        np.random.default_rng(1), batch_size=B, seq_len=T, vocab_size=8, num_kv_pairs=1, power_a=a
    )
    pos_B = np.argmax(batch["mask"], axis=1)
    num_slots = (T + 1 - 2) // 2
    assert set(np.unique(pos_B)) <= {2 + 2 * g for g in range(num_slots)}
    freq = np.bincount((pos_B - 2) // 2, minlength=num_slots) / B
    weight = np.arange(1, num_slots + 1) ** (a - 1.0)
    np.testing.assert_allclose(freq, weight / weight.sum(), atol=0.01)


def test_copying_targets_are_copied_tokens():
    L, T = 5, 16
    batch = data.copying(
        np.random.default_rng(2), batch_size=8, seq_len=T, vocab_size=10, copy_len=L
    )
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    for row_in, row_tg, row_mask in zip(inputs, targets, mask, strict=True):
        sep = list(row_in).index(data.COPY_SEP)
        assert sep == L and data.COPY_SEP not in row_in[:L]
        np.testing.assert_array_equal(row_tg[row_mask == 1], row_in[:L])
        assert row_mask.sum() == L


def test_task_datasets_deterministic_with_separate_eval_stream():
    cfg = data.DataConfig(kind="mqar", seq_len=32, batch_size=4, vocab_size=32, num_kv_pairs=4)
    ds = data.make_dataset(cfg)
    assert ds.vocab_size == 32 and ds.has_accuracy
    np.testing.assert_array_equal(ds.batch(7)["inputs"], data.make_dataset(cfg).batch(7)["inputs"])
    assert not np.array_equal(ds.batch(7)["inputs"], ds.batch(8)["inputs"])
    evals = ds.eval_batches(2)
    np.testing.assert_array_equal(evals[1]["inputs"], ds.eval_batches(2)[1]["inputs"])
    for step in range(4):
        assert not np.array_equal(evals[0]["inputs"], ds.batch(step)["inputs"])
    copy_ds = data.make_dataset(dataclasses.replace(cfg, kind="copying", copy_len=8))
    assert copy_ds.batch(0)["mask"].sum() == 4 * 8


# ----------------------------------------------------------------------------- validation


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="stdlib, files, mqar, copying"):
        data.DataConfig(kind="wikitext", seq_len=8, batch_size=1)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(seq_len=0), "seq_len must be positive, got 0"),
        (dict(num_kv_pairs=9), "seq_len >= 4 \\* num_kv_pairs = 36"),
        (dict(vocab_size=8), "vocab_size=8 too small for num_kv_pairs=4: need >= 10"),
        (dict(kind="copying", copy_len=20), "seq_len >= 2 \\* copy_len = 40"),
        (dict(kind="files"), "needs a glob pattern"),
        (dict(kind="stdlib", max_bytes=0), "max_bytes must be positive"),
    ],
)
def test_bad_config_errors_name_the_value(changes, match):
    kwargs = dict(kind="mqar", seq_len=32, batch_size=2, num_kv_pairs=4) | changes
    with pytest.raises(ValueError, match=match):
        data.make_dataset(data.DataConfig(**kwargs))


def test_bad_split_and_step():
    with pytest.raises(ValueError, match="'valid'"):
        data.load_stdlib("valid")
    ds = data.make_dataset(data.DataConfig(kind="copying", seq_len=40, batch_size=1))
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        ds.batch(-1)
