"""Evaluation people trust: intervals and paired differences, transfer sets, lm-eval through the pipeline
and through ``merit eval``, exported task YAMLs that reproduce merit's scores, tracking, report.html."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from merit.cli import main
from merit.config import HarnessConfig
from merit.errors import ConfigError
from merit.evaluate import harness
from merit.evaluate.stats import macro_interval, paired_difference

from conftest import chat, make_mixture_dir, word, write_jsonl

pytest.importorskip("lm_eval")  # the test extra installs it; without it only the bridge's own tests can run


# ------------------------------------------------------------------------------------------ statistics


def test_paired_difference_of_a_checkpoint_with_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    items = {f"s{i}": rng.integers(0, 2, size=30).astype(float).tolist() for i in range(5)}
    d = paired_difference(items, items)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0) and not d.resolved


def test_interval_holds_the_macro_score_and_a_large_paired_gain_is_resolved():
    rng = np.random.default_rng(1)
    weak = {f"s{i}": (rng.random(200) < 0.3).astype(float).tolist() for i in range(4)}
    strong = {k: [max(x, float(rng.random() < 0.5)) for x in v] for k, v in weak.items()}  # ≥ weak per item
    ci = macro_interval(weak)
    assert ci.low <= ci.estimate <= ci.high and ci.high - ci.low < 0.15
    assert ci.estimate == pytest.approx(np.mean([np.mean(v) for v in weak.values()]))
    d = paired_difference(strong, weak)
    assert d.resolved and d.low > 0
    # one flipped item is not a resolved difference
    nudged = {k: list(v) for k, v in weak.items()}
    nudged["s0"][nudged["s0"].index(0.0)] = 1.0
    assert not paired_difference(nudged, weak).resolved
    with pytest.raises(ValueError, match="same items"):
        paired_difference(weak, {k: v[:-1] for k, v in weak.items()})


# ------------------------------------------------------------------------------------ the pipeline


def mc_rows(name: str, n: int, seed: int) -> list[dict]:
    """A multiple-choice source: which of two words is the uppercase one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = word(rng)
        choices = [w.upper(), w]
        rng.shuffle(choices)
        rows.append(dict(chat(f"Upper of {w}?", w.upper()), choices=choices, answer_index=choices.index(w.upper()),
                         id=f"{name}-{i}"))
    return rows


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_checkpoint):
    """A run with a multiple-choice source, a transfer folder, lm-eval tasks exported from its own held-out
    files, and tensorboard tracking."""
    from merit.evaluate.export import write_tasks
    from merit.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("scored")
    mix = make_mixture_dir(root / "mix", names=["upper_copy", "lower_copy", "upper_rev"], n_train=16, n_eval=6)
    write_jsonl(mix / "train" / "pick_upper.jsonl", mc_rows("pick_upper", 16, 1))
    write_jsonl(mix / "eval" / "pick_upper.jsonl", mc_rows("pick_upper", 8, 2))
    transfer = root / "transfer"
    write_jsonl(transfer / "pick_upper_far.jsonl", mc_rows("far", 12, 3))
    write_jsonl(transfer / "lower_sort.jsonl", [chat("Order: " + w, "".join(sorted(w)))
                                                for w in (word(random.Random(i)) for i in range(6))])
    tokenizer = load_tokenizer(tiny_checkpoint)
    # merit's own held-out lines (first 5 of each source, the eval cap below) as lm-eval tasks
    from merit.data.jsonl import read_examples as read_jsonl

    held_out = {p.stem: read_jsonl(p)[:5] for p in sorted((mix / "eval").glob("*.jsonl"))}
    tasks_dir = root / "tasks"
    write_tasks(held_out, tokenizer, tasks_dir, max_new_tokens=8)
    cfg = {
        "name": "scored",
        "model": {"path": str(tiny_checkpoint)},
        "mixture": {"dir": str(mix), "max_length": 64},
        "grads": {"calibration_size": 8, "batch_size": 8},
        "split": {"r": 1},
        "train": {"batch_size": 8, "learning_rate": 1e-3, "report_to": ["tensorboard"]},
        "baselines": {"random": False},
        "merge": {"operators": ["token-weighted"]},
        "eval": {"max_per_source": 5, "batch_size": 16, "max_new_tokens": 8, "bootstrap": 200,
                 "transfer": {"dir": str(transfer)},
                 "lm_eval": {"tasks": ["merit"], "include_path": str(tasks_dir), "apply_chat_template": False}},
        "launch": {"save_steps": None},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    return path, out, cfg


def test_results_carry_intervals_paired_differences_and_transfer_rows(scored_run):
    _, out, _ = scored_run
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert list(methods) == ["base", "joint", "merit-r1"]
    for name, r in methods.items():
        assert r["ci"][0] <= r["macro"] <= r["ci"][1]
        assert r["n_items"] == 4 * 5
        assert ("vs_joint" in r) == (name != "joint")
        t = r["transfer"]
        assert set(t["per_source"]) == {"pick_upper_far", "lower_sort"} and t["n_items"] == 5 + 5
        assert t["ci"][0] <= t["macro"] <= t["ci"][1]
    d = methods["base"]["vs_joint"]
    assert d["estimate"] == pytest.approx(methods["base"]["macro"] - methods["joint"]["macro"])
    # per-item scores are in the eval files, in the order of the held-out lines
    items = json.loads((out / "eval/joint.json").read_text())["result"]["items"]
    assert np.mean(items["pick_upper"]) == pytest.approx(methods["joint"]["per_source"]["pick_upper"])


def test_lm_eval_in_the_pipeline_reproduces_merit_scores_through_exported_tasks(scored_run):
    _, out, _ = scored_run
    methods = json.loads((out / "results.json").read_text())["methods"]
    for name, r in methods.items():
        lm = r["lm_eval"]["results"]
        assert lm["merit_pick_upper"]["acc,none"] == pytest.approx(r["per_source"]["pick_upper"], abs=1e-9)
        for source in ("upper_copy", "lower_copy", "upper_rev"):
            assert lm[f"merit_{source}"]["exact_match,none"] == pytest.approx(r["per_source"][source], abs=1e-9)
        assert r["lm_eval"]["n_samples"]["merit_pick_upper"] == 5
    assert "lm-evaluation-harness" in (out / "report.md").read_text()


def test_export_tasks_and_merit_eval_with_lm_eval_give_merit_accuracy(scored_run, tmp_path, capsys):
    _, out, _ = scored_run
    tasks = tmp_path / "exported"
    assert main(["export-tasks", str(out), "--out", str(tasks)]) == 0
    assert sorted(p.stem for p in tasks.glob("merit_*.yaml")) == [
        "merit_lower_copy", "merit_pick_upper", "merit_upper_copy", "merit_upper_rev"]
    capsys.readouterr()
    report = tmp_path / "joint.json"
    assert main(["eval", str(out / "joint"), "--mixture", str(out.parent / "mix"), "--max-per-source", "5",
                 "--max-length", "64", "--max-new-tokens", "8", "--lm-eval-tasks", "merit_pick_upper",
                 "merit_upper_copy", "--lm-eval-include", str(tasks), "--no-lm-eval-chat-template",
                 "--out", str(report)]) == 0
    result = json.loads(report.read_text())["result"]
    lm = result["lm_eval"]["results"]
    assert lm["merit_pick_upper"]["acc,none"] == pytest.approx(result["per_source"]["pick_upper"], abs=1e-9)
    assert lm["merit_upper_copy"]["exact_match,none"] == pytest.approx(result["per_source"]["upper_copy"], abs=1e-9)
    assert "95% CI" in capsys.readouterr().out


def test_tensorboard_events_per_branch_and_joint(scored_run):
    _, out, _ = scored_run
    for job in ("branches/0", "branches/1", "joint"):
        events = list((out / "logs" / job).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0, job
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs" / "joint"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and len(acc.Scalars("train/loss")) >= 2


def test_report_html_is_self_contained(scored_run):
    _, out, _ = scored_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # conflict, PCA, per-source and transfer bars
    assert not re.search(r"src=\"(?!data:)", page)  # nothing loaded from beside the file
    for needle in ("macro (95% CI)", "Δ vs joint", "transfer (95% CI)", "merit_pick_upper", "Groups"):
        assert needle in page


def test_a_new_transfer_set_rescored_without_retraining_and_eval_typos_fail_before_work(scored_run, tmp_path, capsys):
    path, out, cfg = scored_run
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("manifest.json")}
    capsys.readouterr()
    cases = [
        ({"lm_eval": {**cfg["eval"]["lm_eval"], "tasks": ["merit", "no_such_task"]}}, "eval.lm_eval.tasks[1]"),
        ({"lm_eval": {**cfg["eval"]["lm_eval"], "include_path": str(tmp_path / "missing")}},
         "eval.lm_eval.include_path"),
        ({"transfer": {"dir": str(out.parent / "mix" / "eval")}}, "also a training source"),
    ]
    for change, needle in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**cfg, "eval": {**cfg["eval"], **change}}))
        rc = main(["run", str(bad), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("merit: error: ") and needle in err[-1], err
        assert {str(p): p.stat().st_mtime_ns for p in out.rglob("manifest.json")} == before
    # a transfer file with the same data as a training source, under another name
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "renamed.jsonl").write_bytes((out.parent / "mix" / "train" / "upper_copy.jsonl").read_bytes())
    bad.write_text(yaml.safe_dump({**cfg, "eval": {**cfg["eval"], "transfer": {"dir": str(dup)}}}))
    assert main(["run", str(bad), "--out", str(out)]) == 2
    assert "same data as training source 'upper_copy'" in capsys.readouterr().err
    # a changed transfer set is scored again; nothing is retrained and the in-mixture scores are kept
    in_mixture = (out / "eval" / "joint.json").stat().st_mtime_ns
    transfer = (out / "eval" / "joint.transfer.json").stat().st_mtime_ns
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**cfg, "eval": {**cfg["eval"], "transfer": {**cfg["eval"]["transfer"],
                                                                                 "max_per_source": 3}}}))
    assert main(["run", str(changed), "--out", str(out)]) == 0
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("manifest.json")} == before
    assert (out / "eval" / "joint.json").stat().st_mtime_ns == in_mixture
    assert (out / "eval" / "joint.transfer.json").stat().st_mtime_ns != transfer
    assert json.loads((out / "results.json").read_text())["methods"]["joint"]["transfer"]["n_items"] == 6


def test_unknown_tracker_and_missing_harness_fail_in_one_line_with_nothing_written(tmp_path, capsys, tiny_checkpoint,
                                                                                   monkeypatch):
    mix = make_mixture_dir(tmp_path / "mix", names=["upper_copy", "lower_copy"], n_train=8, n_eval=2)
    base = {"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix)}, "split": {"r": 1}}
    cases = [
        ({**base, "train": {"report_to": ["tensorbored"]}}, "train.report_to[0]: unknown tracker 'tensorbored'"),
        ({**base, "eval": {"lm_eval": {"tasks": ["arc_easy"]}}}, "eval.lm_eval: needs the lm_eval package"),
        ({**base, "eval": {"transfer": {"dir": str(mix / "eval")}}}, "also a training source"),
    ]
    real = harness.importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    for i, (cfg, needle) in enumerate(cases):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"run{i}"
        rc = main(["run", str(path), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and needle in err[-1] and err[-1].startswith("merit: error: "), err
        assert not out.exists()


# ------------------------------------------------------------------------------------------ lmms-eval


def test_lmms_eval_call_is_the_harness_call_for_a_checkpoint_folder(tmp_path):
    h = HarnessConfig(tasks=["mmbench_en_dev", "mathvista_testmini"], model="qwen2_5_vl", limit=10,
                      model_args={"max_pixels": 614656}, batch_size=1)
    call = harness.lmms_eval_call(h, tmp_path / "ckpt", "cuda:0", seed=3)
    assert call == {"model": "qwen2_5_vl", "model_args": f"pretrained={(tmp_path / 'ckpt').absolute()},max_pixels=614656",
                    "tasks": ["mmbench_en_dev", "mathvista_testmini"], "num_fewshot": None, "batch_size": 1,
                    "device": "cuda:0", "limit": 10, "apply_chat_template": True, "log_samples": False,
                    "random_seed": 3, "numpy_random_seed": 3, "torch_random_seed": 3, "bootstrap_iters": 1000}


def test_lmms_eval_not_installed_or_without_model_class_is_a_config_error(monkeypatch):
    real = harness.importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval.lmms_eval: needs the lmms_eval package.*merit-tune\[lmms-eval\]"):
        harness.check_lmms_eval(HarnessConfig(tasks=["ai2d"], model="qwen2_5_vl"))
    monkeypatch.setattr(harness, "require", lambda *a: None)
    with pytest.raises(ConfigError, match="eval.lmms_eval.model"):
        harness.check_lmms_eval(HarnessConfig(tasks=["ai2d"]))


def test_the_vlm_reference_configs_list_the_papers_eight_benchmarks():
    from merit.config import load_config

    root = Path(__file__).parent.parent / "configs"
    for name in ("qwen2.5-vl-3b-visionflan.yaml", "qwen2.5-vl-7b-mixture.yaml"):
        raw = yaml.safe_load((root / name).read_text())
        h = raw["eval"]["lmms_eval"]
        assert h["tasks"] == ["mmbench_en_dev", "seedbench", "llava_in_the_wild", "mmvet", "textvqa_val", "ai2d",
                              "mathvista_testmini", "mmmu_val"]
        assert h["model_args"]["max_pixels"] == 784 * 784  # the paper's training resolution
        assert load_config(root / name).eval.lmms_eval.model == "qwen2_5_vl"


def test_report_html_renders_in_a_headless_browser(scored_run, tmp_path):
    from merit.report.browser import find_browser, image_widths, screenshot

    if find_browser() is None:
        pytest.skip("no headless Chromium on this machine (the self-contained check above still ran)")
    _, out, _ = scored_run
    widths = image_widths(out / "report.html")
    assert len(widths) >= 4 and all(w > 100 for w in widths), widths
    png = screenshot(out / "report.html", tmp_path / "page.png", height=900)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1200, 900)
        colours = im.convert("L").getcolors(maxcolors=1 << 16)
        assert colours is not None and len(colours) > 20  # text, tables and plots, not a blank page


def test_headline_takes_a_metric_not_the_sample_count():
    from merit.evaluate.harness import headline

    results = {"results": {"gen": {"alias": "gen", "sample_len": 6, "exact_match,none": 0.5,
                                   "exact_match_stderr,none": 0.2},
                           "mc": {"sample_len": 6, "acc_norm,none": 0.4, "acc,none": 0.3}}}
    assert headline(results) == {"gen": ("exact_match,none", 0.5), "mc": ("acc,none", 0.3)}
