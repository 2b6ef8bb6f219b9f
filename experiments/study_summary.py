"""docs/results.md from the study's committed per-unit files (experiments/study.py writes them).

Everything on the page is computed here from ``experiments/results/<preset>/<unit>/``: the design and
its power calculation (from the preset), the learning-rate sweep, in-mixture and transfer tables with
95% intervals and paired differences (vs joint and vs random at the same K), the diagnostics of every
seed, the residual-gradient row, and a verdict on each of the paper's three claims. Units not yet run
are listed as such; nothing is filled in by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from study import Preset, chosen_lr, estimate, is_done, main_units, probe_units, study_units, sweep_units

from merit.diagnose.cli import largest_barrier
from merit.diagnose.probe import verdict
from merit.evaluate.stats import macro_interval, paired_difference

CLAIMS = ("MERIT ≥ joint at equal budget", "MERIT ≥ random", "gains grow with r")


# ------------------------------------------------------------------------------------------ reading


def _items(unit_dir: Path, row: str, part: str = "") -> dict[str, list[float]] | None:
    path = unit_dir / "eval" / (f"{row}.{part}.json" if part else f"{row}.json")
    if not path.exists():
        return None
    return json.loads(path.read_text())["result"]["items"]


def _methods(unit_dir: Path) -> dict:
    path = unit_dir / "results.json"
    return json.loads(path.read_text())["methods"] if path.exists() else {}


def _pooled(per_seed: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Sources of several seeds as one set: the macro over (seed, source) is the mean of the seeds' macros."""
    return {f"s{i}/{src}": v for i, items in enumerate(per_seed) for src, v in items.items()}


# ----------------------------------------------------------------------------------------- formatting


def _ci(iv) -> str:
    return f"{100 * iv.estimate:.1f} [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def _diff(iv) -> str:
    mark = "" if iv.resolved else " n.r."
    return f"{100 * iv.estimate:+.1f} [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]{mark}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def half_width(n_items: int, discordance: float) -> float:
    """95% half-width of a paired difference of two exact-match scores on n items, a fraction
    ``discordance`` of which the two models score differently: 1.96 · sqrt(d / n) (the variance of a
    per-item difference in {−1, 0, 1} is at most d)."""
    return 1.96 * math.sqrt(discordance / n_items)


# -------------------------------------------------------------------------------------------- sections


def design(p: Preset) -> list[str]:
    c = p.config
    mix = c["mixture"]
    tasks = len(mix.get("include") or [])
    per = mix.get("max_train_per_source")
    batch = c["train"]["batch_size"]
    k = 2**p.r_main
    lines = ["## Design", ""]
    if tasks and per:
        joint_steps = tasks * per // batch
        lines += [f"- θ(0) = `{c['model'].get('preset') or c['model'].get('path')}`; mixture: {tasks} BIG-bench tasks × "
                  f"≤ {per} training examples (`mixture.max_train_per_source`), batch {batch}: joint takes "
                  f"≈ {joint_steps} optimizer steps per epoch, each of the K = {k} branches ≈ {joint_steps // k}."]
    else:
        lines += [f"- θ(0) = `{c['model'].get('preset')}`; mixture `{mix.get('dir')}`; batch {batch}; K = {k}."]
    transfer = (c["eval"].get("transfer") or {}).get("include")
    lines += [f"- Evaluation: every held-out line of the {tasks or 'mixture'} in-mixture tasks "
              f"(`eval.max_per_source: {c['eval'].get('max_per_source')}`), and "
              + (f"every held-out line of the {len(transfer)} tasks outside the mixture (the transfer set)."
                 if transfer else "the transfer set of the preset."),
              f"- Learning-rate sweep of joint (seed 0): {', '.join(f'{lr:g}' for lr in p.learning_rates)}; the study "
              "runs every method at the learning rate with the lowest joint in-mixture held-out loss (identical "
              "hyper-parameters, as the paper), and MERIT also at the others (the paper's Table 18).",
              f"- Seeds {', '.join(map(str, p.seeds))}: base, joint, merit-r{p.r_main}, random-k{k}"
              + "".join(f", merit-r{r}" for r in p.r_other) + " on every seed; seed 0 adds "
              + ", ".join(f"`{k_}: {v}`" for k_, v in p.seed0_extras.items())
              + (" and MERIT on residual-gradient conflicts (`split.conflict: residual`)." if p.residual else "."),
              "- Diagnostics (`diagnose.enabled`) on the sweep's units (merge-readiness per learning rate) and on "
              "every seed's main unit."]
    if p.probe_lrs:
        lines.append(f"- `merit probe` (two random halves, {p.probe['fraction']:g} epoch each) at learning rate "
                     f"{', '.join(f'{lr:g}' for lr in p.probe_lrs)}, read against the sweep's full diagnosis there.")
    lines += ["", "### Power", "",
              "A paired difference between two models on n binary items, a fraction d of which they score "
              "differently, has a 95% half-width of about 1.96·√(d/n) (the macro average over sources weighs "
              "items unequally, which widens it slightly; the page's intervals are the paired bootstrap's). "
              "For a 2-point difference to be resolved the half-width must be ≤ 2 points:", ""]
    rows = [[f"{n}"] + [f"{100 * half_width(n, d):.1f}" for d in (0.1, 0.2, 0.3)] for n in (500, 1000, 2000, 4000)]
    lines += _table(["items n", "d = 0.1", "d = 0.2", "d = 0.3"], rows)
    lines += ["", "So ≈ 2,000 items per evaluation set resolve 2 points when the models disagree on ≤ 20% of "
              "items; the measured disagreement d and the intervals are in the tables below.", ""]
    return lines


def planned(p: Preset) -> list[str]:
    """The budget model, before running: per unit, at the middle learning rate of the sweep."""
    lr = p.learning_rates[len(p.learning_rates) // 2]
    units = study_units(p, lr)
    rows, total = [], 0.0
    for i, u in enumerate(units):
        e = estimate(p, u, units[:i])
        total += e["hours"]
        rows.append([u.name, f"{e['epochs']:g}", f"{e['items']}", f"{e['train_h']:.1f}", f"{e['eval_h']:.1f}",
                     f"{e['diagnose_h']:.1f}", f"{e['hours']:.1f}"])
    lines = ["### Compute budget (planned)", "",
             f"The model: an epoch is the mixture's optimizer steps at {p.step_seconds:g} s each; a scored item "
             f"costs {p.item_seconds:g} s; a diagnose loss evaluation {p.diagnose_eval_seconds:g} s "
             "(constants measured on the development machine; a unit reusing a folder pays only what it adds).", ""]
    lines += _table(["unit", "epochs trained", "items scored", "train h", "eval h", "diagnose h", "total h"], rows)
    return lines + ["", f"Planned total: **{total:.1f} h** of 2-core CPU time, run unit by unit across sessions "
                    "(each unit's results are committed as it finishes).", ""]


def budget(p: Preset, results: Path) -> list[str]:
    """Each finished unit's measured hours beside the budget model's, and what the rest will take at the
    measured/planned ratio so far (so the next sessions can be planned from the files)."""
    lines = ["### Compute (measured)", ""]
    done = [json.loads(f.read_text()) for f in sorted(results.glob("*/unit.json"))]
    if not done:
        return lines + ["No unit has run yet.", ""]
    lr = chosen_lr(p, results)
    units = study_units(p, lr if lr is not None else p.learning_rates[len(p.learning_rates) // 2])
    plan = {u.name: estimate(p, u, units[:i])["hours"] for i, u in enumerate(units)}
    # A unit finished before the study kept a clock across tries measured its last try only: a lower bound,
    # shown as "≥" and left out of the measured/planned ratio.
    timed = [u for u in done if "tries" in u or not u.get("last_try_only")]
    total = sum(u["seconds"] for u in done)
    m = done[0]["machine"]
    lines.append(f"Measured: {len(done)} unit(s), {total / 3600:.1f} h on {m['cpus']} cores ({m['cpu']}); per unit "
                 "(wall hours over all of a unit's tries; CPU hours of all its threads):")
    lines.append("")

    def hours(u: dict) -> str:
        return ("≥ " if u not in timed else "") + f"{u['seconds'] / 3600:.2f}"

    lines += _table(["unit", "planned h", "measured h", "CPU h", "tries", "finished", "commit"],
                    [[u["unit"], f"{plan[u['unit']]:.2f}" if u["unit"] in plan else "—", hours(u),
                      f"{u['cpu_seconds'] / 3600:.2f}" if "cpu_seconds" in u else "—", str(u.get("tries", "—")),
                      u["finished"], str(u["commit"])] for u in done])
    notes = [f"{u['unit']}: {u['last_try_only']}" for u in done if u not in timed]
    if notes:
        lines += ["", "Measured on the last try only: " + "; ".join(notes) + "."]
    planned_done = sum(plan[u["unit"]] for u in timed if u["unit"] in plan)
    measured_done = sum(u["seconds"] / 3600 for u in timed if u["unit"] in plan)
    todo = [u for u in units if not is_done(u, results)]
    if planned_done > 0 and todo:
        ratio = measured_done / planned_done
        rest = sum(plan[u.name] for u in todo)
        lines += ["", f"Measured / planned over the units done: {ratio:.2f}. The {len(todo)} unit(s) still to run are "
                  f"planned at {rest:.1f} h: ≈ {rest * ratio:.1f} h at that ratio."]
    return lines + [""]


def status(p: Preset, results: Path) -> list[str]:
    lr = chosen_lr(p, results)
    units = study_units(p, lr)
    todo = [u.name for u in units if not is_done(u, results)]
    line = f"Units done: {len(units) - len(todo)} of {len(units)}" + (f"; still to run: {', '.join(todo)}" if todo else "")
    if lr is None:
        line += " (the units at the chosen learning rate follow the sweep)"
    return [line + ".", ""]


def sweep(p: Preset, results: Path) -> list[str]:
    lines = ["## Learning-rate sweep (seed 0)", ""]
    rows = []
    r = p.r_main
    for u, lr in zip(sweep_units(p), p.learning_rates):
        m = _methods(results / u.name)
        if not m:
            rows.append([f"{lr:g}", "not run", "", "", "", ""])
            continue
        joint, merit = _items(results / u.name, "joint"), _items(results / u.name, f"merit-r{r}")
        rows.append([f"{lr:g}", f"{m['joint']['loss']:.4f}", _ci(macro_interval(joint)),
                     f"{m[f'merit-r{r}']['loss']:.4f}", _ci(macro_interval(merit)), _diff(paired_difference(merit, joint))])
    lines += _table(["learning rate", "joint loss", "joint macro", f"merit-r{r} loss", f"merit-r{r} macro",
                     f"merit-r{r} − joint"], rows)
    lr = chosen_lr(p, results)
    lines += ["", f"Chosen: {lr:g} (lowest joint held-out loss)." if lr is not None else "Chosen: (sweep not finished).", ""]
    return lines


def _row_unit(p: Preset, seed: int, row: str) -> str:
    """Which unit holds a row of a seed (merit-r<r> of another r lives in its r-unit)."""
    for r in p.r_other:
        if row == f"merit-r{r}":
            return f"s{seed}-r{r}"
    if row.endswith("-residual"):
        return "s0-residual"
    return f"s{seed}"


def rows_of(p: Preset) -> list[str]:
    k = 2**p.r_main
    rows = ["base", "joint"]
    budgets = p.seed0_extras.get("baselines.joint_epochs") or []
    rows += [f"joint-{e:g}ep" for e in budgets if e != 1]
    rows += [f"soup-{n}" for n in p.seed0_extras.get("baselines.soups") or []]
    randoms = sorted(set(p.seed0_extras.get("baselines.random_k") or []) | {k})
    rows += [f"random-k{kk}" for kk in randoms]
    rows += [f"merit-r{r}" for r in sorted(p.r_other + [p.r_main])]
    if p.residual:
        rows.append(f"merit-r{p.r_main}-residual")
    return rows


def scores(p: Preset, results: Path, part: str) -> list[str]:
    """One table per evaluation set: each row per seed and pooled over seeds."""
    lr = chosen_lr(p, results)
    title = "Transfer (tasks outside the mixture)" if part == "transfer" else "In-mixture held-out tasks"
    lines = [f"## {title}", ""]
    if lr is None:
        return lines + ["Not run yet (the sweep comes first).", ""]
    k = 2**p.r_main
    table = []
    for row in rows_of(p):
        per_seed, joint_seed, random_seed = [], [], []
        for seed in p.seeds:
            items = _items(results / _row_unit(p, seed, row), row, part)
            joint = _items(results / f"s{seed}", "joint", part)
            rand = _items(results / f"s{seed}", f"random-k{2 ** _r_of(row, p)}", part) if row.startswith("merit") else None
            if items is None or joint is None:
                continue
            per_seed.append(items)
            joint_seed.append(joint)
            random_seed.append(rand)
        if not per_seed:
            table.append([row, "not run", "", "", ""])
            continue
        pooled = _pooled(per_seed)
        n = sum(len(v) for v in per_seed[0].values())
        vs_joint = "—" if row == "joint" else _diff(paired_difference(pooled, _pooled(joint_seed)))
        disagree = "—" if row == "joint" else f"{100 * _disagreement(pooled, _pooled(joint_seed)):.0f}%"
        vs_random = ""
        if row.startswith("merit") and all(r is not None for r in random_seed):
            vs_random = _diff(paired_difference(pooled, _pooled(random_seed)))
        table.append([row, f"{len(per_seed)}", _ci(macro_interval(pooled)), vs_joint, disagree, vs_random, f"{n}"])
    lines += _table(["method", "seeds", "macro (95% CI)", "Δ vs joint", "items scored ≠ joint (d)",
                     f"Δ vs random (same K; K = {k} for r = {p.r_main})", "items per seed"], table)
    lines += ["", "Macro exact match / multiple-choice accuracy in points; pooled over seeds (the macro over "
              "seed × source, bootstrap within each); Δ: paired bootstrap on the same items; n.r.: the interval "
              "holds 0 (not resolved).", ""]
    return lines


def _disagreement(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """The fraction d of items two models score differently (the power calculation's d)."""
    pairs = [(x, y) for src in a for x, y in zip(a[src], b[src])]
    return sum(x != y for x, y in pairs) / len(pairs) if pairs else 0.0


def _r_of(row: str, p: Preset) -> int:
    part = row.split("-")[1]  # merit-r2[-residual]
    return int(part[1:]) if part.startswith("r") and part[1:].isdigit() else p.r_main


def diagnostics(p: Preset, results: Path) -> list[str]:
    """Every diagnosed unit: the sweep's (one per learning rate) and each seed's main unit."""
    lines = ["## Diagnostics per seed (and per learning rate of the sweep)", ""]
    lr = chosen_lr(p, results)
    names = [u.name for u in sweep_units(p)] + ([u.name for u in main_units(p, lr)] if lr is not None else [])
    rows, reports = [], {}
    for name in names:
        path = results / name / "diagnose" / "diagnose.json"
        if not path.exists():
            continue
        d = reports[name] = json.loads(path.read_text())
        main = d["merge_gain"].get(d["main"], {})
        ratio = d["displacement"].get("joint_over_merged")
        auc = {m: v["auc"] for m, v in d["perturbation"]["models"].items()}
        tv = d["displacement"].get("task_vectors")  # diagnoses before it was reported lack it
        geometry = ([f"{tv['mean_pair_cos']:.2f}", f"{tv['mean_retention']:.2f} ({1 / tv['branches']:.2f})",
                     f"{tv['cos_merged_joint']:.2f}" if "cos_merged_joint" in tv else "—"] if tv else ["—"] * 3)
        rows.append([name, d["main"], f"{d['lmc']['max_barrier']:.4g}", "—" if ratio is None else f"{ratio:.2f}",
                     f"{main.get('measured', float('nan')):.4g}",
                     f"{main.get('predicted', float('nan')):.4g} ({main.get('curvature', 'hvp')})",
                     "—" if main.get("ratio") is None else f"{main['ratio']:.2f}",
                     f"{auc.get('merged', float('nan')):.4g} / {auc.get('joint', float('nan')):.4g}",
                     ", ".join(f"{n}: {g['measured']:.3g}" for n, g in d["merge_gain"].items() if n != d["main"]) or "—",
                     *geometry, _random_keeps(d)])
    if not rows:
        return lines + ["No diagnosed unit yet.", ""]
    lines += _table(["unit", "merge", "max LMC barrier", "joint / merged displacement", "measured gain",
                     "predicted gain (curvature by)", "measured / predicted", "flatness AUC merged / joint",
                     "random split's measured gain", "branch updates' mean cos", "merge keeps (if orthogonal)",
                     "cos(merge, joint) update", "random split: mean cos, merge keeps"], rows)
    return lines + ["", "Barrier, gains: in held-out loss (nats per token), on the diagnose sample (8 held-out examples "
                    "per source, so L(θ̄) differs slightly from results.json's). Task vectors τ = θ − θ(0): the mean "
                    "pairwise cosine of the branches' updates, the share (τ̄·τ_k)/‖τ_k‖² of each branch's own update "
                    "the merge keeps (w_k ≈ 1/K if the updates were orthogonal, 1 if equal), and the cosine of the "
                    "merge's update with joint's. docs/diagnostics.md defines each.", ""] + reading(results, reports)


def _random_keeps(d: dict) -> str:
    rv = d["displacement"].get("task_vectors_random")
    return f"{rv['mean_pair_cos']:.2f}, {rv['mean_retention']:.2f}" if rv else "—"


def reading(results: Path, reports: dict[str, dict]) -> list[str]:
    """What the diagnosed units say, in sentences computed from their files: merge-ready or not (the
    probe's own test), does the gain follow Thm 3.1, and how the merge then scores against joint."""
    ready = {name: verdict(d)[0] for name, d in reports.items()}
    ratios = [d["merge_gain"][d["main"]]["ratio"] for d in reports.values()
              if d["merge_gain"][d["main"]].get("ratio") is not None]
    lines = ["Reading:", "",
             f"- Merge-ready by `merit probe`'s test (largest barrier ≤ 1% of its path's end loss and measured "
             f"gain ≥ 0): {sum(ready.values())} of {len(ready)} diagnosed units"
             + (f" (not: {', '.join(n for n, ok in ready.items() if not ok)})." if not all(ready.values()) else ".")]
    if ratios:
        lines.append(f"- Measured / Hessian-predicted merge gain {min(ratios):.2f}–{max(ratios):.2f} (1: the quadratic "
                     "model of Thm 3.1 accounts for the gain).")
    diffs = []
    for name, d in reports.items():
        merit, joint = _items(results / name, d["main"]), _items(results / name, "joint")
        if merit is not None and joint is not None:
            diffs.append(f"{name} {_diff(paired_difference(merit, joint))}")
    if diffs:
        lines.append(f"- The merge against joint on the same units' in-mixture items (points): {'; '.join(diffs)}.")
    keeps = [d["displacement"]["task_vectors"] for d in reports.values() if d["displacement"].get("task_vectors")]
    if keeps:
        lines.append(f"- What the merge keeps: {min(t['mean_retention'] for t in keeps):.2f}–"
                     f"{max(t['mean_retention'] for t in keeps):.2f} of each branch's own update (orthogonal updates: "
                     f"{1 / keeps[0]['branches']:.2f}; branch updates' mean cosine "
                     f"{min(t['mean_pair_cos'] for t in keeps):.2f}–{max(t['mean_pair_cos'] for t in keeps):.2f})"
                     + ("; so even in one basin the merge averages the branches' task-specific updates down rather "
                        "than adding them." if max(t["mean_retention"] for t in keeps) < 0.5 else "."))
    randoms = [d["displacement"]["task_vectors_random"] for d in reports.values()
               if d["displacement"].get("task_vectors_random")]
    if randoms:
        lines.append(f"- The random split's merge keeps {min(t['mean_retention'] for t in randoms):.2f}–"
                     f"{max(t['mean_retention'] for t in randoms):.2f} (branch updates' mean cosine "
                     f"{min(t['mean_pair_cos'] for t in randoms):.2f}–{max(t['mean_pair_cos'] for t in randoms):.2f}).")
    return lines + [""]


def probes(p: Preset, results: Path) -> list[str]:
    """Each probe beside the sweep's full diagnosis at its learning rate: did the cheap verdict predict it?"""
    if not p.probe_lrs:
        return []
    lines = ["## Probe before the budget (`merit probe`)", ""]
    rows, info = [], None
    for unit, lr in zip(probe_units(p), p.probe_lrs):
        folder = results / unit.name
        if not (folder / "probe.json").exists():
            rows.append([f"{lr:g}", "not run"] + [""] * 8)
            continue
        probe, d = (json.loads((folder / f).read_text()) for f in ("probe.json", "diagnose/diagnose.json"))
        info = probe
        worst, relative = largest_barrier(d)
        gain = d["merge_gain"][d["main"]]
        ratio = d["displacement"].get("joint_over_merged")
        full = [u for u, x in zip(sweep_units(p), p.learning_rates) if x == lr]
        full_cells = ["not in the sweep", "", ""]
        if full and (results / full[0].name / "diagnose" / "diagnose.json").exists():
            f_dir = results / full[0].name
            fd = json.loads((f_dir / "diagnose" / "diagnose.json").read_text())
            _, f_rel = largest_barrier(fd)
            row = f"merit-r{p.r_main}"
            full_cells = [f"{fd['lmc']['max_barrier']:.4g} ({100 * (f_rel or 0):.1f}%)",
                          f"{fd['merge_gain'][fd['main']]['measured']:.4g}",
                          _diff(paired_difference(_items(f_dir, row), _items(f_dir, "joint")))]
        rows.append([f"{lr:g}", f"{worst['barrier']:.4g} ({100 * (relative or 0):.1f}%)",
                     f"{gain['measured']:.4g}", f"{gain['predicted']:.4g}",
                     "—" if gain.get("ratio") is None else f"{gain['ratio']:.2f}",
                     "—" if ratio is None else f"{ratio:.2f}",
                     "**merge-ready**" if probe["merge_ready"] else "**not merge-ready**", *full_cells])
    lines += _table(["learning rate", "probe: max barrier (of end loss)", "measured gain", "predicted gain",
                     "measured / predicted", "joint / merged displacement", "verdict",
                     "full run: max barrier", "full run: measured gain", f"full run: merit-r{p.r_main} − joint (in-mixture)"],
                    rows)
    if info is not None:
        t = info["thresholds"]
        lines += ["", f"The probe: two random, sample-balanced halves and the joint run, each {info['fraction']:g} "
                  f"epoch, one token-weighted merge, diagnosed ({', '.join(f'`{k}={v}`' for k, v in p.probe_sets.items()) or 'the config'}). "
                  f"Merge-ready: largest barrier ≤ {t['barrier_relative']:.0%} of its path's end loss and measured "
                  f"gain ≥ {t['measured_gain']:g}. The full run's columns are the sweep's unit at the same learning "
                  "rate (K = {0}, one epoch): a probe that says merge-ready while the full merge still loses to "
                  "joint shows that merge-readiness is necessary, not sufficient.".format(2**p.r_main)]
    return lines + [""]


def residual(p: Preset, results: Path) -> list[str]:
    if not p.residual:
        return []
    lines = ["## Research row: conflicts on residual gradients", ""]
    res, main = results / "s0-residual" / "split" / "plan.json", results / "s0" / "split" / "plan.json"
    if not (res.exists() and main.exists()):
        return lines + ["Not run yet.", ""]
    a, b = json.loads(main.read_text()), json.loads(res.read_text())
    same = sorted(map(sorted, a["groups"])) == sorted(map(sorted, b["groups"]))
    lines += [f"- Groups: {'the same as' if same else 'different from'} the cosine split's "
              f"(proxy {a.get('proxy', float('nan')):.4g} → {b.get('proxy', float('nan')):.4g}, on their own conflict matrices).",
              "- Scores: the `merit-r{0}-residual` rows of the tables above.".format(p.r_main), ""]
    return lines


def verdicts(p: Preset, results: Path) -> list[str]:
    """Each claim: reproduced (resolved, in the paper's direction), not reproduced (resolved, against),
    or not resolved, on the transfer set pooled over seeds (the paper's claim is about held-out benchmarks),
    with the reason (the interval, and for an unresolved one how large a difference these items resolve) and
    the in-mixture difference beside it."""
    lines = ["## The paper's claims", ""]
    lr = chosen_lr(p, results)
    if lr is None:
        return lines + ["Not decided: the study has not run yet.", ""]
    part = "transfer" if p.config["eval"].get("transfer") else ""

    def pooled(row: str, where: str) -> dict | None:
        per = [_items(results / _row_unit(p, s, row), row, where) for s in p.seeds]
        return None if any(x is None for x in per) else _pooled(per)

    def verdict(a: str, b: str) -> str:
        x, y = pooled(a, part), pooled(b, part)
        if x is None or y is None:
            return f"not decided: {a} or {b} has not run on every seed"
        iv = paired_difference(x, y)
        n, d = sum(map(len, x.values())), _disagreement(x, y)
        word = ("reproduced" if iv.estimate > 0 else "not reproduced") if iv.resolved else "not resolved"
        why = ("the 95% paired interval excludes 0" if iv.resolved else
               f"the interval holds 0; the two disagree on {100 * d:.0f}% of the items, so differences under about "
               f"±{100 * half_width(n, d):.1f} points do not resolve here")
        line = f"**{word}**: {a} − {b} = {_diff(iv)} points on {n} items ({len(p.seeds)} seed(s)): {why}"
        if part:
            xi, yi = pooled(a, ""), pooled(b, "")
            if xi is not None and yi is not None:
                line += f"; in-mixture {_diff(paired_difference(xi, yi))}"
        return line

    k = 2**p.r_main
    lines.append(f"1. {CLAIMS[0]}: {verdict(f'merit-r{p.r_main}', 'joint')}.")
    lines.append(f"2. {CLAIMS[1]}: {verdict(f'merit-r{p.r_main}', f'random-k{k}')}.")
    if p.r_other:
        lines.append(f"3. {CLAIMS[2]}: {verdict(f'merit-r{p.r_main}', f'merit-r{min(p.r_other)}')}.")
    return lines + ["", f"(Decided on the {'transfer' if part else 'in-mixture'} set, pooled over seeds; resolved: the "
                    "95% paired interval excludes 0.)", ""]


def write_summary(p: Preset, results: Path, out: Path) -> list[Path]:
    lines = [f"# SmolLM2 × BIG-bench: the powered study (preset `{p.name}`)", "",
             "Generated by `experiments/study_summary.py` from the committed files in "
             f"`experiments/results/{p.name}/` (rerun `python experiments/study.py summarize` to refresh; "
             "`python experiments/study.py run --commit` continues the study where it stopped). The pilot "
             "before it (12 tasks × 32 examples, 2 seeds, 20–25 items per task) is in "
             "[results-pilot.md](results-pilot.md).", ""]
    lines += status(p, results) + design(p) + planned(p) + budget(p, results) + sweep(p, results)
    lines += scores(p, results, "") + scores(p, results, "transfer")
    lines += diagnostics(p, results) + probes(p, results) + residual(p, results) + verdicts(p, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(out)
    return [out]
