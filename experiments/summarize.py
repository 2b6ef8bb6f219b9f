"""Aggregate run folders of one experiment into a Markdown results page.

    python experiments/summarize.py runs/smollm2-bigbench-s*-r* --out docs/results-pilot.md

Methods are pooled across folders by name (``base`` and ``joint`` may come from several folders of the
same seed: each (seed, method) counts once). Each cell is the mean over seeds, with the spread
(min–max) when there are several. The conflict heatmap and PCA scatter of the first r = 2 run are
copied next to the page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import yaml

ORDER = ["base", "joint", "random-k2", "random-k4", "random-k8", "merit-r1", "merit-r2", "merit-r3"]


def collect(folders: list[Path]) -> tuple[dict, list[str], list[int]]:
    """{method: {seed: result}} over the folders that have finished (results.json present)."""
    table: dict[str, dict[int, dict]] = {}
    sources: list[str] = []
    seeds = set()
    for f in folders:
        res = f / "results.json"
        if not res.exists():
            continue
        seed = yaml.safe_load((f / "config.yaml").read_text())["seed"]
        seeds.add(seed)
        for name, r in json.loads(res.read_text())["methods"].items():
            table.setdefault(name, {}).setdefault(seed, r)
            sources = sources or list(r["per_source"])
    return table, sources, sorted(seeds)


def collect_transfer(folders: list[Path]) -> tuple[dict, list[str]]:
    """{method: {seed: result}} from the folders' transfer/<method>.json (tasks outside the mixture)."""
    table: dict[str, dict[int, dict]] = {}
    sources: list[str] = []
    for f in folders:
        if not (f / "config.yaml").exists():
            continue
        seed = yaml.safe_load((f / "config.yaml").read_text())["seed"]
        if (f / "results.json").exists():  # eval.transfer in the pipeline: the transfer block of each row
            for name, r in json.loads((f / "results.json").read_text())["methods"].items():
                if "transfer" in r:
                    table.setdefault(name, {}).setdefault(seed, r["transfer"])
                    sources = sources or list(r["transfer"]["per_source"])
        for res in sorted((f / "transfer").glob("*.json")):  # run folders from before eval.transfer
            r = json.loads(res.read_text())["result"]
            table.setdefault(res.stem, {}).setdefault(seed, r)
            sources = sources or list(r["per_source"])
    return table, sources


def cell(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.1f}" if pct else f"{m:.3f}"
    lo, hi = min(values) * scale, max(values) * scale
    return f"{m:.1f} ({lo:.1f}–{hi:.1f})" if pct else f"{m:.3f} ({lo:.3f}–{hi:.3f})"


def method_table(table: dict, sources: list[str], lines: list[str]) -> None:
    """Append the macro table (mean and min–max over seeds) and the per-source table to ``lines``."""
    methods = sorted(table, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    lines += ["| method | seeds | macro score | mean eval loss |", "|---|---:|---:|---:|"]
    for m in methods:
        runs = list(table[m].values())
        lines.append(f"| {m} | {len(runs)} | {cell([r['macro'] for r in runs])} | "
                     f"{cell([r['loss'] for r in runs], pct=False)} |")
    lines += ["", "Per source (mean over seeds, %):", "",
              "| source | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for s in sources:
        row = [cell([r["per_source"][s] for r in table[m].values()]).split(" ")[0] for m in methods]
        lines.append(f"| {s} | " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    table, sources, seeds = collect(args.folders)
    if not table:
        raise SystemExit("no finished run folder (results.json) among the arguments")
    lines = [f"Seeds: {', '.join(map(str, seeds))}. Cells: mean over seeds (min–max). Scores in %.", "",
             "**Held-out examples of the 12 training tasks:**", ""]
    method_table(table, sources, lines)
    transfer, t_sources = collect_transfer(args.folders)
    if transfer:
        lines += ["", "**Transfer: 8 BIG-bench tasks in no training mixture** (25 examples each; "
                  "the paper's claim is about benchmarks outside the training mixture):", ""]
        method_table(transfer, t_sources, lines)
    img = args.out.parent / "img"
    for f in args.folders:
        if (f / "split/conflict.png").exists() and "-r2" in f.name:
            img.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f / "split/conflict.png", img / "smollm2-bigbench-conflict.png")
            shutil.copy2(f / "split/pca.png", img / "smollm2-bigbench-pca.png")
            plan = json.loads((f / "split/plan.json").read_text())
            lines += ["", f"Groups of merit-r2 ({f.name}):", ""]
            lines += [f"- group {k} ({n} samples, weight {w:.3f}): {', '.join(g)}"
                      for k, (g, n, w) in enumerate(zip(plan["groups"], plan["samples"], plan["weights"]))]
            break
    text = "\n".join(lines) + "\n"
    marker_start, marker_end = "<!-- results:start -->", "<!-- results:end -->"
    if args.out.exists() and marker_start in args.out.read_text():
        page = args.out.read_text()
        head, rest = page.split(marker_start, 1)
        tail = rest.split(marker_end, 1)[1]
        page = f"{head}{marker_start}\n{text}{marker_end}{tail}"
    else:
        page = f"{marker_start}\n{text}{marker_end}\n"
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")  # written whole, then renamed
    tmp.write_text(page)
    tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
