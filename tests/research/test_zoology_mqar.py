"""research.zoology_mqar: the smoke study end to end, its reports, state bytes, resumption."""

import json

import pytest

import models
from research.zoology_mqar import configs, report, run


def test_configs_match_attention_width_and_params():
    attention = configs.model_config(configs.FAMILIES["attention"], 32, 128)
    assert (attention.d_model, attention.num_heads, attention.num_kv_heads) == (32, 2, 1)
    assert attention.ffn_dim == 96 and attention.vocab_size == 128
    target = models.count_params(attention) - configs.embedding_params(attention)
    for family in configs.FAMILIES.values():
        if configs.available(family) is not None:
            continue
        cfg = configs.model_config(family, 32, 128)
        assert cfg.d_model == 32 and cfg.num_layers in family.layer_choices
        ratio = (models.count_params(cfg) - configs.embedding_params(cfg)) / target
        assert 0.5 < ratio < 2.0, (family.name, ratio)


def test_missing_family_is_skipped(monkeypatch):
    ghost = configs.Family("ghost", "no-such-preset", (2,), "a family not in models")
    monkeypatch.setitem(configs.FAMILIES, "ghost", ghost)
    assert "no-such-preset" in configs.available(ghost)


def test_curriculum_then_each_task_in_turn():
    tasks = (configs.Task(16, 2), configs.Task(32, 4), configs.Task(64, 8))
    study = configs.StudyConfig(train_tasks=tasks, steps=10, curriculum_steps=4)
    assert [run.task_index(study, s) for s in range(10)] == [0, 0, 0, 0, 0, 1, 2, 0, 1, 2]


def test_study_config_rejects_bad_curriculum_and_lr_names():
    with pytest.raises(ValueError, match="curriculum_steps"):
        configs.StudyConfig(steps=10, curriculum_steps=11)
    with pytest.raises(ValueError, match="valid"):
        configs.StudyConfig(lrs=(("transformer", 1e-3),))
    study = configs.StudyConfig(lrs=(("gla", 1e-2),), default_lr=3e-3)
    assert (study.lr("gla"), study.lr("attention")) == (1e-2, 3e-3)


@pytest.mark.slow
def test_smoke_study_end_to_end_and_resume(tmp_path, monkeypatch):
    study = configs.get_config("smoke")
    results = run.run_study(study, tmp_path, progress=False)

    present = [f for f in study.families if configs.available(configs.FAMILIES[f]) is None]
    assert "attention" in present
    cells = {(r["family"], r["width"], r["seq_len"], r["num_kv_pairs"]) for r in results["runs"]}
    grid = [(f, w, t) for f in present for w in study.widths for t in study.tasks]
    expected = {(f, w, t.seq_len, t.num_kv_pairs) for f, w, t in grid}
    assert cells == expected and len(results["runs"]) == len(expected)
    assert {s["family"] for s in results["skipped"]} == set(study.families) - set(present)
    for r in results["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == study.steps
        assert r["params"] > r["non_embedding_params"] > 0

    per_run = {(r["family"], r["width"]): r["train_seconds"] for r in results["runs"]}
    assert results["train_seconds_all_runs"] == pytest.approx(sum(per_run.values()))
    assert results["seconds_this_invocation"] >= results["train_seconds_all_runs"] > 0

    on_disk = json.loads((tmp_path / report.RESULTS_JSON).read_text())
    assert on_disk["runs"] == json.loads(json.dumps(results["runs"]))
    table = (tmp_path / report.RESULTS_MD).read_text()
    assert table.count("| attention |") == len(study.widths) * len(study.tasks)
    assert "s over all runs" in table
    assert (tmp_path / report.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    by_cell = {(r["family"], r["width"], r["seq_len"]): r for r in results["runs"]}
    (short, long_), width = study.tasks, study.widths[0]
    for family in present:
        a, b = by_cell[family, width, short.seq_len], by_cell[family, width, long_.seq_len]
        if family == "attention":
            # Keys and values, float32, every layer and kv head, one slot per position.
            cfg = configs.model_config(configs.FAMILIES["attention"], width, study.vocab_size)
            per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
            assert a["state_bytes"] == short.seq_len * per_token
            assert b["state_bytes"] == long_.seq_len * per_token
        else:
            assert a["state_bytes"] == b["state_bytes"] > 0, family

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(run, "fit", no_training)
    again = run.run_study(study, tmp_path, progress=False)
    assert again["runs"] == results["runs"]
