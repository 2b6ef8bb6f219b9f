"""The powered study's script and summariser on the tiny preset: units run, results are collected and
the study resumes from the collected files alone (no run folders)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import make_mixture_dir

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(EXPERIMENTS))
    import study as module

    yield module
    sys.path.remove(str(EXPERIMENTS))


def test_unit_clock_adds_up_every_try(study, tmp_path):
    import time

    path = tmp_path / ".study-clock-u.json"
    first = study.UnitClock(path, every=0.05)
    time.sleep(0.3)
    first._stop.set()  # the try is stopped without finishing: what its thread last wrote is on disk
    first._thread.join()
    stopped = json.loads(path.read_text())["tries"][0]["wall"]
    assert stopped >= 0.2
    measured = study.UnitClock(path).finish()
    assert measured["tries"] == 2 and stopped <= measured["seconds"] < stopped + 5


def test_tiny_study_runs_collects_resumes_and_summarises(study, tmp_path, tiny_checkpoint, capsys):
    from study_summary import write_summary

    data = make_mixture_dir(tmp_path / "mix", names=["upper_copy", "lower_rev"], n_train=16, n_eval=4)
    transfer = make_mixture_dir(tmp_path / "mix-transfer", names=["upper_rev"], n_train=4, n_eval=4)
    preset = study.tiny_preset(data, transfer, tiny_checkpoint)
    runs, results, page = tmp_path / "runs", tmp_path / "results", tmp_path / "results.md"
    ran = study.run(preset, runs, results, summary_out=page)
    # the sweep (2 learning rates), the probe, then the seed at the chosen one, then the residual-conflict row
    assert ran == ["lr-0.001", "lr-0.003", "probe-lr0.001", "s0", "s0-residual"]
    lr = study.chosen_lr(preset, results)
    losses = {u: json.loads((results / u / "results.json").read_text())["methods"]["joint"]["loss"]
              for u in ("lr-0.001", "lr-0.003")}
    assert lr == (0.001 if losses["lr-0.001"] <= losses["lr-0.003"] else 0.003)
    s0 = results / "s0"
    info = json.loads((s0 / "unit.json").read_text())
    assert info["sets"]["train.learning_rate"] == lr and info["machine"]["cpus"] >= 1
    for f in ("results.json", "config.yaml", "split/plan.json", "diagnose/diagnose.json", "eval/joint.json",
              "eval/merit-r1.transfer.json", "eval/joint-0.5ep.json"):
        assert (s0 / f).is_file(), f
    assert not list(results.rglob("*.safetensors"))  # never a checkpoint
    assert (results / "s0-residual" / "eval" / "merit-r1-residual.json").is_file()
    probe_dir = results / "probe-lr0.001"
    probe = json.loads((probe_dir / "probe.json").read_text())
    assert probe["fraction"] == 0.5 and json.loads((probe_dir / "unit.json").read_text())["probe"] == preset.probe
    probe_plan = json.loads((probe_dir / "split" / "plan.json").read_text())
    assert probe_plan["method"] == "random" and len(probe_plan["groups"]) == 2  # two random halves

    # Resume from the collected files alone: the run folders are gone, nothing is rerun.
    shutil.rmtree(runs)
    assert study.run(preset, runs, results) == []
    assert "[done] s0-residual" in study.plan_text(preset, results)

    text = page.read_text()
    for heading in ("## Design", "### Power", "## Learning-rate sweep", "## In-mixture held-out tasks",
                    "## Transfer", "## Diagnostics per seed", "## Research row", "## The paper's claims"):
        assert heading in text, heading
    assert "Units done: 5 of 5" in text
    # Every diagnosed unit has its row: the sweep's learning rates and the seed's main unit.
    diag = text.split("## Diagnostics per seed")[1].split("\n## ")[0]
    assert all(f"| {u} | merit-r1 | " in diag for u in ("lr-0.001", "lr-0.003", "s0")), diag
    # Its reading counts the units the probe's own test calls merge-ready, from their files.
    from merit.diagnose.probe import verdict

    ready = sum(verdict(json.loads((results / u / "diagnose" / "diagnose.json").read_text()))[0]
                for u in ("lr-0.001", "lr-0.003", "s0"))
    assert f"gain ≥ 0): {ready} of 3 diagnosed units" in diag
    # The seed's unit takes the curvatures by second differences, the sweep's by HVPs; the page says which.
    assert json.loads((s0 / "diagnose" / "diagnose.json").read_text())["merge_gain"]["merit-r1"]["curvature"] \
        == "second-difference"
    assert "(second-difference) |" in diag and "(hvp) |" in diag
    s0_tv = json.loads((s0 / "diagnose" / "diagnose.json").read_text())["displacement"]["task_vectors"]
    assert f"| {s0_tv['mean_pair_cos']:.2f} | {s0_tv['mean_retention']:.2f} (0.50) |" in diag
    s0_rv = json.loads((s0 / "diagnose" / "diagnose.json").read_text())["displacement"]["task_vectors_random"]
    assert f"| {s0_rv['mean_pair_cos']:.2f}, {s0_rv['mean_retention']:.2f} |" in diag
    assert "The random split's merge keeps" in diag
    # The verdicts come from the files: joint's row equals its own results.json score.
    joint = json.loads((s0 / "results.json").read_text())["methods"]["joint"]
    assert f"| joint | 1 | {100 * joint['macro']:.1f} [" in text
    assert "items scored ≠ joint (d)" in text
    # The probe's row: its own barrier and gain, its verdict, beside the full diagnosis at its learning rate.
    probe_section = text.split("## Probe before the budget")[1].split("\n## ")[0]
    d = json.loads((probe_dir / "diagnose" / "diagnose.json").read_text())
    row = next(line for line in probe_section.splitlines() if line.startswith("| 0.001 |"))
    assert f"| {d['merge_gain'][d['main']]['measured']:.4g} |" in row
    assert ("**merge-ready**" if probe["merge_ready"] else "**not merge-ready**") in row
    full = json.loads((results / "lr-0.001" / "diagnose" / "diagnose.json").read_text())
    assert f"| {full['merge_gain'][full['main']]['measured']:.4g} |" in row
    assert sum(line.startswith(("1. ", "2. ")) for line in text.splitlines()) == 2
    assert any(w in text for w in ("**reproduced**", "**not reproduced**", "**not resolved**"))
    claim_1 = next(line for line in text.splitlines() if line.startswith("1. "))
    assert "points on " in claim_1 and "; in-mixture " in claim_1  # the reason and the in-mixture reading
    # A summary of a study that has not started says so, and decides nothing.
    # The measured compute sits beside the budget model's plan, unit by unit.
    info = json.loads((results / "s0" / "unit.json").read_text())
    assert f"| s0 | {study.estimate(preset, study.main_units(preset, lr)[0], study.study_units(preset, lr)[:3])['hours']:.2f} " \
           f"| {info['seconds'] / 3600:.2f} |" in text
    assert info["tries"] == 1 and info["cpu_seconds"] > 0 and "| CPU h | tries |" in text
    # A unit recorded before the clock kept every try is shown as a lower bound and left out of the ratio.
    stale = results / "lr-0.001" / "unit.json"
    record = json.loads(stale.read_text())
    stale.write_text(json.dumps({k: v for k, v in record.items() if k not in ("tries", "cpu_seconds")}
                                | {"last_try_only": "it ran in 2 tries"}))
    marked = write_summary(preset, results, tmp_path / "marked.md")[0].read_text()
    assert "| lr-0.001 | " in marked and f"| ≥ {record['seconds'] / 3600:.2f} |" in marked
    assert "Measured on the last try only: lr-0.001: it ran in 2 tries." in marked
    stale.write_text(json.dumps(record))
    # Half-way, the page says what the rest will take at the measured/planned ratio.
    partial = tmp_path / "partial"
    shutil.copytree(results, partial)
    shutil.rmtree(partial / "s0-residual")
    half = write_summary(preset, partial, tmp_path / "half.md")[0].read_text()
    assert "The 1 unit(s) still to run are planned at" in half
    empty = write_summary(preset, tmp_path / "none", tmp_path / "empty.md")[0].read_text()
    assert "Units done: 0 of 3" in empty and "Not decided" in empty
