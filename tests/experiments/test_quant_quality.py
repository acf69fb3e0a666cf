"""experiments.quant_quality --smoke: trains, then one row per recipe with closed-form bytes,
and the float and int8 KV-cache rows."""

import json

import numpy as np

from experiments import quant_quality


def test_smoke_table(tmp_path):
    rows = quant_quality.run(str(tmp_path), smoke=True)
    labels = [label for label, _ in quant_quality.RECIPES]
    assert [r["recipe"] for r in rows[: len(labels)]] == labels and len(rows) == len(labels) + 2
    base = rows[0]
    # Reading the float cache back in chunks is the full forward: equal up to float rounding.
    assert abs(rows[-2]["vs_float"]) < 1e-5
    assert rows[-1]["recipe"].startswith("int8 KV cache") and rows[-1]["vs_float"] != 0
    assert base["recipe"] == "float32" and base["vs_float"] == 0.0
    # Linear layers of the config: per block q, k, v, o, gate, up, down (D=256, 8 heads of 32,
    # 2 kv heads, F=768), 4 blocks, tied head: K*N float32 bytes each.
    D, F, KV = 256, 768, 2 * 32
    shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, F), (D, F), (F, D)] * 4
    assert base["linear_bytes"] == sum(4 * k * n for k, n in shapes)
    by_recipe = {r["recipe"]: r for r in rows}
    int8 = by_recipe["int8 weights, per channel"]
    assert int8["linear_bytes"] == sum(k * n + 4 * n for k, n in shapes)
    int4 = by_recipe["int4 weights, group 128"]
    assert int4["linear_bytes"] == sum(k * n // 2 + 4 * (k // 128) * n for k, n in shapes)
    for r in rows:
        assert np.isfinite(r["perplexity"]) and abs(r["vs_float"]) < 0.05, r
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["rows"] == rows and saved["eval_tokens"] > 0
    table = quant_quality.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| float32 | " in table
