"""Every chart of the study, one function each, drawn from summary.json (docs/design.md).

The HTML report embeds them as PNG (workflow_scripts/report.py) and notebooks/analysis.ipynb shows the
very same figures, so the two never disagree. Figures are built with matplotlib's object API (no pyplot):
no global state and no GUI backend, in a job or in a notebook kernel alike.
"""
from __future__ import annotations

import base64
import io

from matplotlib.figure import Figure

PNG_DPI = 100


def plain_text(text) -> str:
    """Text for matplotlib as it is: a '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight")
    return buf.getvalue()


def png_base64(fig: Figure) -> str:
    return base64.b64encode(png_bytes(fig)).decode("ascii")


# Marker per published source in the accuracy chart (cycled when there are more sources).
SOURCE_MARKERS = ("D", "s", "^", "v", "P", "X", "o")


def chart_references(result: dict, comparison: list[dict]) -> list[dict]:
    """The top-1 reference figures drawn at a result's bar: a released model's beside the as-released bar,
    every other one beside the fine-tuned bar (each source made its figure one of these two ways)."""
    released = result["result_from"] == "released"
    return [r for r in comparison if r["metric"] == "top1" and r["column"] == result["column"]
            and (r["model"], r["pretraining"], r["image_size"]) == (result["label"], result["pretraining"],
                                                                    result["image_size"])
            and (r["source_protocol"].get("result") == "released") == released]


def accuracy_chart(results: list[dict], comparison: list[dict]) -> Figure | None:
    """One horizontal bar per result of ours with a number (summary.json `results`: fine-tuned mean and as
    released; error bar: its 95% interval), every reference top-1 of the same cell as a marker per source;
    None if nothing has a number."""
    rows = [r for r in results if r["top1_mean"] is not None]
    if not rows:
        return None
    sources = list(dict.fromkeys(ref["source"] for r in rows for ref in chart_references(r, comparison)))
    fig = Figure(figsize=(9, 1.4 + 0.32 * len(rows)), layout="constrained")
    ax = fig.subplots()
    ys = range(len(rows))
    low = [r["ci_low"] if r["ci_low"] is not None else r["top1_mean"] for r in rows]
    high = [r["ci_high"] if r["ci_high"] is not None else r["top1_mean"] for r in rows]
    errors = [[r["top1_mean"] - x for r, x in zip(rows, low)], [x - r["top1_mean"] for r, x in zip(rows, high)]]
    bars = ax.barh(ys, [r["top1_mean"] for r in rows], 0.6, xerr=errors, capsize=3, color="#9db7dd",
                   label="ours (95% interval)")
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=3)
    for source, marker in zip(sources, SOURCE_MARKERS * len(sources)):
        points = [(ref["reference_value"], y) for y, r in zip(ys, rows) for ref in chart_references(r, comparison)
                  if ref["source"] == source]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=28, zorder=3,
                   label=plain_text(source))
    ax.set_yticks(list(ys))
    ax.set_yticklabels([plain_text(f"{r['label']} · {r['pretraining']} · {r['column']}"
                                   + (" (as released)" if r["result_from"] == "released" else "")
                                   + (" (subset)" if r.get("subset") else "")) for r in rows], fontsize=8)
    ax.invert_yaxis()  # the first row on top, as in the tables
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_xlim(0, 112)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)
    return fig


def lr_sweep_chart(pairs: list[dict]) -> Figure | None:
    """Mean minival top-1 against base LR per pair (points: seeds); the selected LR is starred. None without pairs."""
    if not pairs:
        return None
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    for pair in pairs:
        candidates = sorted(pair["candidates"], key=lambda c: c["lr"])
        line, = ax.plot([c["lr"] for c in candidates], [c["minival_top1_mean"] for c in candidates], marker="o",
                        label=plain_text(f"{pair['label']} / {pair['dataset_label']}"))
        for c in candidates:
            ax.scatter([c["lr"]] * len(c["minival_top1_per_seed"]), c["minival_top1_per_seed"],
                       s=10, color=line.get_color(), alpha=0.5)
        chosen = [c for c in candidates if float(c["lr"]) == float(pair["selected_lr"])]
        ax.scatter([c["lr"] for c in chosen], [c["minival_top1_mean"] for c in chosen], marker="*", s=220,
                   color=line.get_color(), edgecolor="black", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate")
    ax.set_ylabel("minival top-1 (%)")
    ax.set_title("LR sweep (★ = selected on minival)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def training_curves_chart(pair: dict, runs: list[dict], curves: dict) -> Figure:
    """Loss, learning rate and minival top-1 against step, one line per run of the pair (summary "pairs" entry)."""
    fig = Figure(figsize=(12, 3.2), layout="constrained")  # keeps the middle y label off the left panel
    axes = fig.subplots(1, 3)
    for run in runs:
        if (run["checkpoint"], run["dataset"]) != (pair["checkpoint"], pair["dataset"]):
            continue
        curve = curves[run["run_dir"]]
        name = plain_text(f"lr {run['lr']:g}, seed {run['seed']}" + (" (selected)" if run["selected"] else ""))
        axes[0].plot(curve["step"], curve["loss"], label=name)
        axes[1].plot(curve["step"], curve["lr"], label=name)
        axes[2].plot(curve["eval_step"], curve["minival_top1"], marker="o", label=name)
    for ax, ylabel in zip(axes, ("training loss", "learning rate", "minival top-1 (%)")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    return fig
