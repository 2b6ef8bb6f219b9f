"""The powered SmolLM2 × BIG-bench study (docs/results.md): resumable, unit by unit, from committed results.

    python experiments/study.py plan      [--preset full]          # the units, their settings and budget
    python experiments/study.py run       [--preset full] [--commit] [--only UNIT ...] [--max-units N]
    python experiments/study.py summarize [--preset full] [--out docs/results.md]

A *unit* is one ``merit run`` of the study's config with a few ``--set`` overrides, in its own run folder
under ``runs/study-<preset>/``. When it finishes, its compact results — results.json, the per-item eval
files, diagnose.json, the split plans and conflict matrices, the config — are copied to
``experiments/results/<preset>/<unit>/`` with a ``unit.json`` (settings, seconds, machine, git commit),
and with ``--commit`` committed at once. A unit whose ``unit.json`` is there with the same settings is
done: the study resumes from what is committed, on any machine, without the run folders (which hold the
checkpoints and are never committed). Units run in order:

1. ``lr-<lr>`` for each learning rate of the sweep (seed 0): joint and MERIT at the main r, diagnosed
   (merge-readiness at each learning rate). The study's learning rate is the one with the lowest joint
   in-mixture held-out loss.
2. For each seed ``s<seed>`` (base, joint, MERIT at the main r, random at the main K, with the
   diagnose stage; seed 0 adds joint at 0.5 and 2 epochs, soup-2 and random at K = 2); then for each
   seed ``s<seed>-r<r>`` for the other r (MERIT and nothing else); then ``s0-residual`` (MERIT on
   residual-gradient conflicts, ``split.conflict: residual``). The sweep and every seed's main unit are
   diagnosed (≈ 1.3 h each on 2 cores for SmolLM2); the r- and residual units are not.

Between them, ``probe-lr<lr>`` units run ``merit probe`` (two random halves, a fraction of an epoch) at
the preset's probe learning rates, so the page can set the probe's verdict beside the full diagnosis at
the same learning rate.

Seed 0's ``s0`` folder is the sweep's folder at the chosen learning rate, so its joint and MERIT runs
are not trained twice (the pipeline resumes them by key).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"


@dataclass(frozen=True)
class Preset:
    """What the study runs: one config and the grid of units around it."""

    name: str
    config: dict  # a merit run config (paths absolute or relative to the repository root)
    learning_rates: list[float]
    seeds: list[int]
    r_main: int
    r_other: list[int] = field(default_factory=list)
    residual: bool = True
    seed0_extras: dict = field(default_factory=dict)  # --set values of s0 only (budgets, soups, K = 2)
    sweep_sets: dict = field(default_factory=dict)  # --set values of the learning-rate sweep only
    seed_sets: dict = field(default_factory=dict)  # --set values of every seed's main (diagnosed) unit
    # The budget model's constants on the machine the study runs on (seconds): one optimizer step of
    # the config's batch, one scored evaluation item, one loss evaluation of the diagnose sample.
    step_seconds: float = 3.0
    item_seconds: float = 0.2
    diagnose_eval_seconds: float = 6.0
    hvp_seconds: float = 1.0
    eval_items: tuple[int, int] = (0, 0)  # (in-mixture, transfer) items per checkpoint, for the budget
    # ``merit probe`` at these learning rates (seed 0), after the sweep, so that its quarter-epoch verdict can
    # be read against the full run's diagnosis at the same learning rate: does the probe predict it?
    probe_lrs: list[float] = field(default_factory=list)
    probe: dict = field(default_factory=lambda: {"fraction": 0.25, "alphas": 6, "draws": 2})  # its flags
    probe_sets: dict = field(default_factory=dict)  # --set values of the probe units only


# 24 training tasks: the 12 of the pilot (docs/results-pilot.md) and 12 more with short prompts; the 24
# others of the development mixture are the transfer set, all their held-out lines.
MIXTURE = [
    "arithmetic", "unnatural_in_context_learning__unnatural_addition_2_digit",
    "unnatural_in_context_learning__identity", "unnatural_in_context_learning__reverse_natural_content",
    "unnatural_in_context_learning__dates", "unnatural_in_context_learning__dates_unnatural_form",
    "word_unscrambling", "object_counting", "hyperbaton", "sports_understanding", "strategyqa", "anachronisms",
    "auto_categorization", "color", "international_phonetic_alphabet_transliterate", "matrixshapes", "operators",
    "simp_turing_concept", "qa_wikidata", "tense", "ruin_names", "snarks", "disambiguation_qa", "winowhy",
]
TRANSFER = [
    "ascii_word_recognition", "contextual_parametric_knowledge_conflicts", "date_understanding",
    "epistemic_reasoning", "formal_fallacies_syllogisms_negation", "intent_recognition", "logical_deduction",
    "logical_fallacy_detection", "misconceptions", "modified_arithmetic", "moral_permissibility",
    "movie_dialog_same_or_different",
    "natural_instructions__subtask004_mctaco_answer_generation_event_duration",
    "natural_instructions__subtask005_mctaco_wrong_answer_generation_event_duration",
    "natural_instructions__subtask033_winogrande_answer_generation",
    "natural_instructions__subtask039_qasc_find_overlapping_words",
    "natural_instructions__subtask041_qasc_answer_generation",
    "natural_instructions__subtask050_multirc_answerability", "presuppositions_as_nli", "social_support",
    "temporal_sequences", "unnatural_in_context_learning__dates_unnatural_content",
    "unnatural_in_context_learning__reverse_to_natural_content", "vitaminc_fact_verification",
]
BIGBENCH = str((ROOT.parent / "shared" / "data" / "bigbench-mix").resolve())

FULL = Preset(
    name="full",
    config={
        "name": "study", "seed": 0, "model": {"preset": "smollm2-135m-instruct"},
        "mixture": {"dir": BIGBENCH, "include": MIXTURE, "max_train_per_source": 80, "max_length": 256},
        "grads": {"calibration_size": 24, "batch_size": 8},
        "split": {"r": 2},
        # bf16 mixed precision (fp32 master weights): ~1.5× cheaper steps on this CPU (benchmarks/train_results.md)
        "train": {"learning_rate": 1.0e-4, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.1, "precision": "bf16"},
        "merge": {"operators": ["token-weighted"]},
        "eval": {"max_per_source": None, "batch_size": 16, "max_new_tokens": 16, "normalize": "lower",
                 "transfer": {"dir": BIGBENCH, "include": TRANSFER, "max_per_source": None}},
        # 6-point paths (step 0.2), 1 ± draw, 8 examples per source: 78 loss evaluations of 192 examples
        # (27 s each) and 8 HVPs (310 s each) per unit, ≈ 1.3 h (benchmarks/diagnose_results.md); L(θ̄)
        # then differs from results.json's, which uses every held-out line.
        "diagnose": {"alphas": 6, "draws": 1, "max_per_source": 8},
        "launch": {"save_steps": 50},
    },
    learning_rates=[3.0e-5, 1.0e-4, 3.0e-4],
    seeds=[0, 1, 2],
    r_main=2,
    r_other=[1],
    seed0_extras={"baselines.joint_epochs": [0.5, 1, 2], "baselines.soups": [2], "baselines.random_k": [2, 4]},
    sweep_sets={"eval.transfer": None},  # the sweep selects on in-mixture held-out loss
    # The sweep and the probe took the predicted gain's curvatures by HVPs (8 × 310 s, ≈ 0.7 h a unit);
    # the seeds' units take them by second differences (16 losses × 27 s), which agree with the HVPs
    # within 1.3% on this study's folders at a sixth of the time (benchmarks/diagnose_results.md).
    seed_sets={"diagnose.curvature": "second-difference"},
    # Measured on the 2-core development machine: a bf16 branch step of this mixture (batch 8) 5.2 s
    # (the first unit's branches: 60 steps in 311 s, saves included); scoring 0.18 s per item in bf16
    # (benchmarks/eval_results.md); the held-out lines of the two task sets.
    # A diagnose loss evaluation (192 examples, weights set in place) 27 s and an HVP 310 s, measured on
    # a SmolLM2 run folder of this study (benchmarks/diagnose_results.md).
    step_seconds=5.2, item_seconds=0.2, diagnose_eval_seconds=27.0, hvp_seconds=310.0, eval_items=(1986, 2136),
    # The probe at the sweep's middle learning rate; 8 held-out examples per source for its evaluation and
    # its diagnosis (the sweep's diagnose sample), so that it costs minutes rather than the hours of
    # scoring every held-out line.
    probe_lrs=[1.0e-4],
    probe={"fraction": 0.25, "alphas": 6, "draws": 1},  # the sweep's diagnose settings
    probe_sets={"eval.max_per_source": 8},
)


def tiny_preset(data: Path, transfer: Path, model: Path | None = None) -> Preset:
    """The CI version: the tiny model (or the checkpoint ``model``) on a 2-task mixture in ``data`` (train/
    and eval/) with the transfer sources in ``transfer`` (their eval/), 1 seed, r = 1."""
    return Preset(
        name="tiny",
        config={
            "name": "study-tiny", "seed": 0, "model": {"path": str(model)} if model else {"preset": "tiny"},
            "mixture": {"dir": str(data), "max_length": 48},
            "grads": {"calibration_size": 8, "batch_size": 8},
            "split": {"r": 1},
            "train": {"learning_rate": 1.0e-3, "batch_size": 8, "epochs": 1},
            "merge": {"operators": ["token-weighted"]},
            "eval": {"max_per_source": 4, "batch_size": 16, "max_new_tokens": 4, "bootstrap": 200,
                     "transfer": {"dir": str(transfer)}},
            "diagnose": {"alphas": 3, "draws": 1},
            "launch": {"save_steps": None},
        },
        learning_rates=[1.0e-3, 3.0e-3],
        seeds=[0],
        r_main=1,
        residual=True,
        seed0_extras={"baselines.joint_epochs": [0.5, 1]},
        seed_sets={"diagnose.curvature": "second-difference"},
        probe_lrs=[1.0e-3],
        probe={"fraction": 0.5, "alphas": 3, "draws": 1},
    )


# ---------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    name: str
    folder: str  # run folder name under runs/study-<preset>/
    sets: dict  # --set overrides (values as YAML)
    probe: dict | None = None  # a `merit probe` unit: its flags (fraction, alphas, draws); None: a `merit run`

    def overrides(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in self.sets.items()]

    def command(self, config: Path, folder: Path) -> list[str]:
        """The merit command line of this unit."""
        sets = sum((["--set", s] for s in self.overrides()), [])
        if self.probe is None:
            return ["run", str(config), "--out", str(folder), *sets]
        flags = sum(([f"--{k}", str(v)] for k, v in self.probe.items()), [])
        return ["probe", str(config), "--out", str(folder), *sets, *flags]


def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


def sweep_units(p: Preset) -> list[Unit]:
    return [Unit(f"lr-{_lr_tag(lr)}", f"s0-lr{_lr_tag(lr)}",
                 {"seed": 0, "train.learning_rate": lr, "split.r": p.r_main, "baselines.random": False,
                  "diagnose.enabled": True, **p.sweep_sets})
            for lr in p.learning_rates]


def probe_units(p: Preset) -> list[Unit]:
    return [Unit(f"probe-lr{_lr_tag(lr)}", f"probe-lr{_lr_tag(lr)}",
                 {"seed": 0, "train.learning_rate": lr, **p.probe_sets}, probe=p.probe) for lr in p.probe_lrs]


def main_units(p: Preset, lr: float) -> list[Unit]:
    """The units at the study's learning rate, in the order they run: every seed's main unit first (joint,
    MERIT and random at the main K: what claims 1 and 2 need), then the other r on every seed (claim 3),
    then the residual-conflict row, so that a study cut short has decided what its finished units can."""
    units = []
    for seed in p.seeds:
        extras = p.seed0_extras if seed == 0 else {"baselines.random_k": [2**p.r_main]}
        units.append(Unit(f"s{seed}", f"s{seed}-lr{_lr_tag(lr)}",
                          {"seed": seed, "train.learning_rate": lr, "split.r": p.r_main, **extras,
                           "diagnose.enabled": True, **p.seed_sets}))
    for seed in p.seeds:
        for r in p.r_other:
            units.append(Unit(f"s{seed}-r{r}", f"s{seed}-lr{_lr_tag(lr)}-r{r}",
                              {"seed": seed, "train.learning_rate": lr, "split.r": r, "baselines.joint": False,
                               "baselines.random": False}))
    if p.residual and 0 in p.seeds:
        units.append(Unit("s0-residual", f"s0-lr{_lr_tag(lr)}-residual",
                          {"seed": 0, "train.learning_rate": lr, "split.r": p.r_main, "split.conflict": "residual",
                           "baselines.joint": False, "baselines.random": False}))
    return units


def study_units(p: Preset, lr: float | None) -> list[Unit]:
    """Every unit in the order they run (the main units once the sweep has chosen ``lr``)."""
    return sweep_units(p) + probe_units(p) + (main_units(p, lr) if lr is not None else [])


def estimate(p: Preset, unit: Unit, earlier: list[Unit]) -> dict:
    """The budget model of one unit: epochs trained, checkpoints scored, hours (training, evaluation,
    diagnosis). A folder that an earlier unit already ran (s0 is the sweep's folder) costs only what it adds."""
    data = p.config["mixture"]
    steps = len(data.get("include") or []) * (data.get("max_train_per_source") or 0) / p.config["train"]["batch_size"]
    d = {**p.config.get("diagnose", {}), **(unit.probe or {})}
    if unit.probe is not None:
        return _probe_estimate(p, unit, steps, d)

    def rows(sets: dict) -> tuple[float, int, bool]:
        epochs, ckpts = 1.0, 2  # the main split's branches (one epoch in all) and its merge; θ(0)
        if sets.get("baselines.joint", True):
            budgets = [e for e in sets.get("baselines.joint_epochs") or [] if e != 1]
            soups = sets.get("baselines.soups") or []
            epochs += 1 + sum(budgets) + (max(soups) - 1 if soups else 0)
            ckpts += 1 + len(budgets) + len(soups)
        if sets.get("baselines.random", True):
            randoms = sets.get("baselines.random_k") or [2 ** sets.get("split.r", p.r_main)]
            epochs += len(randoms)
            ckpts += len(randoms)
        transfer = "eval.transfer" not in sets or sets["eval.transfer"] is not None
        return epochs, ckpts, transfer

    epochs, ckpts, transfer = rows(unit.sets)
    before = [u for u in earlier if u.folder == unit.folder]
    if before:
        e0, c0, t0 = rows(before[-1].sets)
        epochs -= e0
        new_items = (ckpts - c0) * p.eval_items[0] + (ckpts * p.eval_items[1] if transfer and not t0 else 0)
    else:
        new_items = ckpts * (p.eval_items[0] + (p.eval_items[1] if transfer else 0))
    train_h = epochs * steps * p.step_seconds / 3600
    eval_h = new_items * p.item_seconds / 3600
    k = 2 ** unit.sets.get("split.r", p.r_main)
    evaluations = (k * (k - 1) // 2 + k) * d.get("alphas", 21) + 3 * 3 * d.get("draws", 3) * 2
    directions = k * (2 if unit.sets.get("baselines.random", True) else 1)  # MERIT's branches, and random's
    diag_h = ((evaluations * p.diagnose_eval_seconds + directions * _curvature_seconds(p, unit)) / 3600
              if unit.sets.get("diagnose.enabled") else 0.0)
    return {"epochs": epochs, "checkpoints": ckpts, "items": new_items, "train_h": train_h, "eval_h": eval_h,
            "diagnose_h": diag_h, "hours": train_h + eval_h + diag_h}


def _curvature_seconds(p: Preset, unit: Unit) -> float:
    """One branch's curvature term of the predicted gain: an HVP, or two loss evaluations (second difference)."""
    method = unit.sets.get("diagnose.curvature", p.config.get("diagnose", {}).get("curvature", "hvp"))
    return 2 * p.diagnose_eval_seconds if method == "second-difference" else p.hvp_seconds


def _probe_estimate(p: Preset, unit: Unit, steps: float, d: dict) -> dict:
    """A probe: two halves at ``fraction`` epoch each (together ``fraction`` of an epoch's steps) and the joint
    run at ``fraction``; θ(0), joint and the merge scored on its in-mixture sample; one pair and two
    branch→merge paths, the perturbations of the three models, two HVPs (one per half)."""
    epochs = 2 * unit.probe["fraction"]
    cap = unit.sets.get("eval.max_per_source", p.config["eval"].get("max_per_source"))
    tasks = len(p.config["mixture"].get("include") or [])
    per_ckpt = min(cap * tasks, p.eval_items[0]) if cap and tasks else p.eval_items[0]
    items = 3 * per_ckpt
    evaluations = 3 * d.get("alphas", 11) + 3 * 3 * d.get("draws", 2) * 2
    train_h = epochs * steps * p.step_seconds / 3600
    eval_h = items * p.item_seconds / 3600
    diag_h = (evaluations * p.diagnose_eval_seconds + 2 * _curvature_seconds(p, unit)) / 3600
    return {"epochs": epochs, "checkpoints": 3, "items": items, "train_h": train_h, "eval_h": eval_h,
            "diagnose_h": diag_h, "hours": train_h + eval_h + diag_h}


def chosen_lr(p: Preset, results: Path) -> float | None:
    """The sweep's learning rate with the lowest joint in-mixture held-out loss (None until all have run)."""
    losses = {}
    for u, lr in zip(sweep_units(p), p.learning_rates):
        res = results / u.name / "results.json"
        if not res.exists():
            return None
        losses[lr] = json.loads(res.read_text())["methods"]["joint"]["loss"]
    return min(losses, key=losses.get)


# ------------------------------------------------------------------------------------------- running


def is_done(unit: Unit, results: Path) -> bool:
    info = results / unit.name / "unit.json"
    if not info.exists():
        return False
    done = json.loads(info.read_text())
    return done.get("sets") == unit.sets and done.get("probe") == unit.probe


COMPACT = ["results.json", "probe.json", "config.yaml", "split/plan.json", "split/conflict.json", "split/pca.json",
           "diagnose/diagnose.json", "grads/manifest.json"]


def collect(run: Path, target: Path) -> list[Path]:
    """Copy the run's compact files (never checkpoints) into ``target``; returns what was copied."""
    copied = []
    files = [run / f for f in COMPACT] + sorted((run / "eval").glob("*.json"))
    files += sorted((run / "baselines").glob("*/split/plan.json"))
    for f in files:
        if f.is_file():
            dest = target / f.relative_to(run)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
            copied.append(dest)
    return copied


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu or platform.processor(), "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_seconds() -> float:
    """This process's CPU seconds (all threads) and its finished children's (the local launcher's branches)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class UnitClock:
    """A unit's compute across tries: each try's wall and CPU seconds are kept in ``path`` (rewritten every
    ``every`` seconds by a daemon thread), so a unit stopped and resumed — another session, a restart — is
    measured over all its tries, not only the last one (a try's last minute before it was stopped is lost)."""

    def __init__(self, path: Path, every: float = 60.0):
        import threading

        self.path, self.every = path, every
        self.tries = json.loads(path.read_text())["tries"] if path.exists() else []
        self.tries.append({"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall": 0.0, "cpu": 0.0})
        self._wall0, self._cpu0 = time.time(), _cpu_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick_every, daemon=True)
        self.tick()
        self._thread.start()

    def tick(self) -> None:
        self.tries[-1].update(wall=round(time.time() - self._wall0, 1), cpu=round(_cpu_seconds() - self._cpu0, 1))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"tries": self.tries}, indent=2) + "\n")
        os.replace(tmp, self.path)

    def _tick_every(self) -> None:
        while not self._stop.wait(self.every):
            self.tick()

    def finish(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.tick()
        return {"seconds": round(sum(t["wall"] for t in self.tries), 1),
                "cpu_seconds": round(sum(t["cpu"] for t in self.tries), 1), "tries": len(self.tries)}


def run_unit(p: Preset, unit: Unit, runs: Path, results: Path, config_path: Path) -> Path:
    from merit.cli import main as merit

    folder = runs / unit.folder
    folder.mkdir(parents=True, exist_ok=True)
    clock = UnitClock(folder / f".study-clock-{unit.name}.json")  # per unit: units can share a folder
    rc = merit(unit.command(config_path, folder))
    measured = clock.finish()
    if rc != 0:
        raise SystemExit(f"study: unit {unit.name} failed (merit {'probe' if unit.probe else 'run'} exit {rc}); "
                         f"its log is in {folder}")
    target = results / unit.name
    if target.exists():
        shutil.rmtree(target)
    tmp = results / f".{unit.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    collect(folder, tmp)
    (tmp / "unit.json").write_text(json.dumps({
        "unit": unit.name, "preset": p.name, "sets": unit.sets, "probe": unit.probe, "folder": str(folder),
        **measured, "machine": machine(), "commit": git_commit(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=2) + "\n")
    os.replace(tmp, target)  # a unit's folder appears complete or not at all
    return target


def commit(paths: list[Path], message: str) -> None:
    subprocess.run(["git", "-C", str(ROOT), "add", "--", *map(str, paths)], check=True)
    subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", message, "--", *map(str, paths)], check=False)


def write_config(p: Preset, runs: Path) -> Path:
    import yaml

    runs.mkdir(parents=True, exist_ok=True)
    path = runs / "study.yaml"
    path.write_text(yaml.safe_dump(p.config, sort_keys=False))
    return path


def run(p: Preset, runs: Path, results: Path, *, only: list[str] | None = None, max_units: int | None = None,
        do_commit: bool = False, summary_out: Path | None = None) -> list[str]:
    """Run every unit not yet done, in order; returns the names of the units run now."""
    config_path = write_config(p, runs)
    ran: list[str] = []

    def todo(units: list[Unit]) -> list[Unit]:
        return [u for u in units if (only is None or u.name in only) and not is_done(u, results)]

    for stage in ("sweep", "probe", "main"):
        if stage == "sweep":
            units = sweep_units(p)
        elif stage == "probe":
            units = probe_units(p)
        else:
            lr = chosen_lr(p, results)
            if lr is None:
                break
            units = main_units(p, lr)
        for u in todo(units):
            if max_units is not None and len(ran) >= max_units:
                return ran
            print(f"study: unit {u.name} ({' '.join(u.overrides())})", flush=True)
            target = run_unit(p, u, runs, results, config_path)
            ran.append(u.name)
            paths = [target]
            if summary_out is not None:
                from study_summary import write_summary

                paths += write_summary(p, results, summary_out)
            if do_commit:
                commit(paths, f"study ({p.name}): unit {u.name}")
    return ran


def plan_text(p: Preset, results: Path) -> str:
    lr = chosen_lr(p, results)
    lines = [f"study preset {p.name}: sweep {p.learning_rates}, seeds {p.seeds}, r {p.r_main} (+{p.r_other})"]
    for u in study_units(p, lr):
        flags = " ".join(f"--{k} {v}" for k, v in (u.probe or {}).items())
        lines.append(f"  [{'done' if is_done(u, results) else 'todo'}] {u.name:14s} {' '.join(u.overrides())} {flags}".rstrip())
    if lr is None:
        lines.append("  (the units at the chosen learning rate are listed once the sweep has run)")
    return "\n".join(lines)


def preset_named(name: str, data: Path | None) -> Preset:
    if name == "full":
        return FULL
    if name == "tiny":
        if data is None:
            raise SystemExit("study: --preset tiny needs --data DIR (a mixture folder with train/ and eval/, "
                             "and DIR-transfer/ with eval/)")
        return tiny_preset(data, data.with_name(f"{data.name}-transfer"))
    raise SystemExit(f"study: unknown preset {name!r}; use full or tiny")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["plan", "run", "summarize"])
    ap.add_argument("--preset", default="full")
    ap.add_argument("--data", type=Path, help="tiny preset: its mixture folder")
    ap.add_argument("--runs", type=Path, help="run folders (default runs/study-<preset>)")
    ap.add_argument("--results", type=Path, help="compact results (default experiments/results/<preset>)")
    ap.add_argument("--out", type=Path, help="summary page (default docs/results.md for full)")
    ap.add_argument("--only", nargs="+", help="run only these units")
    ap.add_argument("--max-units", type=int, help="stop after this many units")
    ap.add_argument("--commit", action="store_true", help="git commit each unit's results as it finishes")
    args = ap.parse_args(argv)
    p = preset_named(args.preset, args.data)
    runs = args.runs or ROOT / "runs" / f"study-{p.name}"
    results = args.results or RESULTS / p.name
    out = args.out or (ROOT / "docs" / "results.md" if p.name == "full" else results / "summary.md")
    sys.path.insert(0, str(Path(__file__).parent))
    if args.command == "plan":
        print(plan_text(p, results))
    elif args.command == "run":
        ran = run(p, runs, results, only=args.only, max_units=args.max_units, do_commit=args.commit,
                  summary_out=out)
        print(f"study: ran {len(ran)} unit(s): {', '.join(ran) or 'none (all done)'}")
    else:
        from study_summary import write_summary

        for path in write_summary(p, results, out):
            print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
