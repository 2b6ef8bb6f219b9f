"""``merit split --compare``: every split method on an existing run's stored gradients, scored by the
merge-gain proxy (``merit.split.proxy``), in one table. Nothing is trained and nothing is written.

    merit split --compare --run runs/demo
    merit split --compare configs/my.yaml --set split.r=3
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from merit.argtypes import positive_int
from merit.errors import ConfigError


def add_parser(subparsers) -> None:
    """Add the ``split`` command to the CLI's subparsers."""
    p = subparsers.add_parser("split", help="compare split methods by merge-gain proxy on a run's stored gradients")
    p.add_argument("config", nargs="?", type=Path, help="the run's YAML config (run folder: --out or runs/<name>)")
    p.add_argument("--compare", action="store_true", help="print every method's groups and proxy score")
    p.add_argument("--run", type=Path, metavar="DIR", help="an existing run folder (uses its config.yaml)")
    p.add_argument("--out", type=Path, help="with CONFIG: the run folder (default: runs/<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set split.r=3 (repeatable)")
    p.add_argument("--random-seeds", type=positive_int, default=32, metavar="N",
                   help="random splits averaged for the reference row (default: 32)")
    p.add_argument("--groups", action="store_true", help="also list each method's groups")


def _folder_and_config(args: argparse.Namespace):
    from merit.config import load_config

    if (args.config is None) == (args.run is None):
        raise ConfigError("merit split --compare: give a CONFIG file or --run DIR (one of them)")
    if args.run is not None:
        if not (args.run / "config.yaml").is_file():
            raise ConfigError(f"{args.run}: not a run folder (no config.yaml)")
        return args.run, load_config(args.run / "config.yaml", args.overrides)
    cfg = load_config(args.config, args.overrides)
    return args.out or Path("runs") / cfg.name, cfg


def run(args: argparse.Namespace) -> int:
    """Print the comparison table; 0 on success (user errors raise ConfigError)."""
    from merit import artifacts, plugins
    from merit.conflict.store import load_conflict
    from merit.split.partition import SplitInputs, random_split
    from merit.split.proxy import compare

    if not args.compare:
        raise ConfigError("merit split: only --compare is available here; the split stage itself runs with "
                          "`merit run CONFIG --until split`")
    folder, cfg = _folder_and_config(args)
    grads = folder / "grads"
    mixture = artifacts.read_manifest(folder / "mixture")
    if artifacts.read_manifest(grads) is None or mixture is None:
        raise ConfigError(f"{folder}: no finished gradients stage; run `merit run CONFIG --until grads` first")
    names, conflict = load_conflict(grads)
    if len(names) < 2 ** cfg.split.r:
        raise ConfigError(f"split.r={cfg.split.r} needs at least {2 ** cfg.split.r} sources; {folder} has gradients "
                          f"of {len(names)}")
    entry = {e["name"]: e for e in mixture["sources"]}
    missing = [n for n in names if n not in entry]
    if missing:
        raise ConfigError(f"{folder}: gradients for {missing} but no such source in mixture/manifest.json")
    samples = np.array([entry[n]["samples"] for n in names])
    tokens = np.array([entry[n]["tokens"] for n in names])
    x = SplitInputs(conflict, samples, tokens, cfg.split.r, cfg.seed, names, cfg.split.groups)
    methods = [m for m in plugins.names("split") if m != "manual" or cfg.split.groups]
    candidates = {m: (lambda fn=plugins.get("split", m): fn(x)) for m in methods}
    rows = compare(conflict, tokens, candidates, random_draws=lambda s: random_split(replace(x, seed=s)),
                   n_random=args.random_seeds)
    for r in rows:
        if r.get("groups") is not None:
            r["samples"] = [int(samples[g].sum()) for g in r["groups"]]
    print(f"{folder}: {len(names)} sources, r = {cfg.split.r} (K = {2 ** cfg.split.r}), seed {cfg.seed}, "
          f"compression {artifacts.read_manifest(grads).get('compression')}")
    print("proxy P = Σ_k w_k ‖ḡ_k − ḡ‖² of unit gradients, token-weighted (larger = larger first-order merge "
          "gain); share = P / total dispersion")
    print(format_rows(rows, names if args.groups else None))
    return 0


def format_rows(rows: list[dict], names: list[str] | None = None) -> str:
    """A plain-text table of ``merit.split.proxy.compare`` rows (with group members when ``names`` is given)."""
    head = f"{'method':<28} {'K':>3} {'proxy':>10} {'share':>7} {'× random':>9}  samples per group"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<28} error: {r['error']}")
            continue
        k = len(r["groups"]) if r["groups"] is not None else ""
        extra = r.get("samples", f"(std {r['proxy_std']:.5f} across seeds)" if "proxy_std" in r else "")
        lines.append(f"{r['method']:<28} {k!s:>3} {r['proxy']:>10.5f} {r['share']:>7.3f} "
                     f"{r.get('vs_random', float('nan')):>8.2f}×  {extra}")
        if names is not None and r["groups"] is not None:
            lines += [f"    group {i}: {', '.join(names[j] for j in g)}" for i, g in enumerate(r["groups"])]
    return "\n".join(lines)
