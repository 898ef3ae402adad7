"""Choose the base learning rate of one checkpoint x dataset by mean minival top-1 over seeds.

Only the minival figures of the training summaries are read; nothing here can see a test metric.
Ties (equal mean minival top-1) go to the smaller learning rate: the more conservative choice, and
deterministic whatever the order of the inputs.
"""
from __future__ import annotations

import argparse
import statistics

from .common import PipelineError, read_json, run_cli, write_json

CRITERION = "highest mean minival top-1 over seeds; ties -> smaller learning rate"


def read_minival(summary_path, checkpoint: str, dataset: str) -> tuple[float, int, float]:
    """(lr, seed, minival_top1) of one run summary: the only fields selection may use."""
    summary = read_json(summary_path)
    for key in ("checkpoint", "dataset", "lr", "seed", "minival_top1"):
        if summary.get(key) is None:
            raise PipelineError(f"{summary_path}: '{key}' is missing; rerun that fine-tuning job")
    if (summary["checkpoint"], summary["dataset"]) != (checkpoint, dataset):
        raise PipelineError(f"{summary_path}: belongs to {summary['checkpoint']} x {summary['dataset']}, "
                            f"not {checkpoint} x {dataset}")
    return float(summary["lr"]), int(summary["seed"]), float(summary["minival_top1"])


def choose_lr(minival_top1: dict[float, dict[int, float]]) -> tuple[float, list[dict]]:
    """The selected LR and the candidate table, from {lr: {seed: minival top-1}} alone."""
    if not minival_top1:
        raise PipelineError("no runs to select from")
    seed_sets = {lr: sorted(per_seed) for lr, per_seed in minival_top1.items()}
    if len({tuple(s) for s in seed_sets.values()}) > 1:
        raise PipelineError(f"learning rates were run with different seeds ({seed_sets}); compare like with like")
    candidates = []
    for lr in sorted(minival_top1):
        seeds = seed_sets[lr]
        values = [minival_top1[lr][s] for s in seeds]
        candidates.append({"lr": lr, "seeds": seeds, "minival_top1_per_seed": values,
                           "minival_top1_mean": statistics.fmean(values)})
    best = max(candidates, key=lambda c: (c["minival_top1_mean"], -c["lr"]))
    return best["lr"], candidates


def select(checkpoint: str, dataset: str, summary_paths: list[str]) -> dict:
    table: dict[float, dict[int, float]] = {}
    seen: dict[tuple[float, int], str] = {}
    for path in summary_paths:
        lr, seed, top1 = read_minival(path, checkpoint, dataset)
        if (lr, seed) in seen:
            raise PipelineError(f"{path}: lr {lr} seed {seed} also in {seen[(lr, seed)]}")
        table.setdefault(lr, {})[seed] = top1
        seen[(lr, seed)] = str(path)
    selected_lr, candidates = choose_lr(table)
    return {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "criterion": CRITERION,
        "candidates": candidates,
        "selected_lr": selected_lr,
        "selected_seeds": sorted(table[selected_lr]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="summary.json of every run of the sweep")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    selection = select(args.checkpoint, args.dataset, args.runs)
    write_json(args.out, selection)
    print(f"{args.checkpoint} x {args.dataset}: selected lr {selection['selected_lr']:g} "
          f"({CRITERION})")
    return 0


if __name__ == "__main__":
    run_cli(main)
