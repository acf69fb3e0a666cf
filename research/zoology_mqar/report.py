"""Reports of the Zoology MQAR study: ``results.json``, ``results.md`` and a PNG of query
accuracy against model dimension and against decode-state bytes (one line per family)."""

from __future__ import annotations

import json

from etils import epath

from experiments import plots

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILE = "recall_vs_state.png"


def _tasks(runs: list[dict]) -> list[tuple[int, int]]:
    return list(dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in runs))


def _families(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["family"] for r in runs))


def markdown(results: dict) -> str:
    """One table per task: family, width, layers, parameters, state bytes, accuracy."""
    runs = results["runs"]
    lines = []
    for seq_len, pairs in _tasks(runs):
        lines += [
            f"MQAR T={seq_len}, {pairs} key-value pairs:",
            "",
            "| family | d_model | layers | params (non-embedding) | state bytes / seq | "
            "query accuracy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            if (r["seq_len"], r["num_kv_pairs"]) == (seq_len, pairs):
                lines.append(
                    f"| {r['family']} | {r['width']} | {r['num_layers']} | "
                    f"{r['params']:,} ({r['non_embedding_params']:,}) | "
                    f"{r['state_bytes']:,} | {100 * r['accuracy']:.1f}% |"
                )
        lines.append("")
    for s in results.get("skipped", []):
        lines.append(f"- skipped `{s['family']}`: {s['reason']}")
    if "train_seconds_all_runs" in results:
        lines += [
            "",
            f"Training (with compilation and scoring) {results['train_seconds_all_runs']:,.0f} s "
            f"over all runs; this invocation {results['seconds_this_invocation']:,.0f} s "
            f"wall-clock ({results['date']}).",
        ]
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path) -> None:
    """PNG: a column per task; accuracy vs ``d_model`` (top) and vs state bytes (bottom, log x)."""
    from matplotlib.ticker import NullFormatter

    runs = results["runs"]
    tasks = _tasks(runs) or [(0, 0)]
    fig = plots.figure(4.8 * len(tasks), 7.2)
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for col, (seq_len, pairs) in enumerate(tasks):
        top, bottom = axes[0][col], axes[1][col]
        for family in _families(runs):
            points = sorted(
                (r["width"], r["state_bytes"], r["accuracy"])
                for r in runs
                if r["family"] == family and (r["seq_len"], r["num_kv_pairs"]) == (seq_len, pairs)
            )
            if not points:
                continue
            widths, state, acc = zip(*points, strict=True)
            top.plot(widths, acc, "o-", label=family, markersize=4)
            bottom.plot(state, acc, "o-", label=family, markersize=4)
        top.set_title(f"MQAR T={seq_len}, {pairs} kv pairs")
        top.set_xscale("log", base=2)
        top.set_xlabel("model dimension")
        bottom.set_xscale("log")
        bottom.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
        bottom.set_xlabel("decode-state bytes per sequence")
        for ax in (top, bottom):
            ax.set_ylabel("query accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    plots.save_png(fig, path)


def write_all(results: dict, workdir) -> None:
    """``results.json``, ``results.md`` and the PNG in ``workdir``."""
    workdir = epath.Path(workdir)
    (workdir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    (workdir / RESULTS_MD).write_text(markdown(results))
    plot(results, workdir / PLOT_FILE)
