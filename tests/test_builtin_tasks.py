"""Tests for the built-in, code-generated task mixture (merit.data.builtin)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from merit.data.builtin import (
    CONFLICT_PAIRS,
    TASKS,
    WARMUP_TASKS,
    BuiltinTask,
    builtin_mixture,
    make_split,
)

REQUIRED_FAMILIES = {"strings", "case", "arithmetic", "counting", "classification", "format", "sequences"}


def _prompt(ex: dict) -> str:
    return ex["messages"][0]["content"]


def _answer(ex: dict) -> str:
    return ex["messages"][1]["content"]


def _samples(task: BuiltinTask, n: int = 200, seed: int = 123) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [task.generate(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def mixture() -> dict[str, tuple[list[dict], list[dict]]]:
    return builtin_mixture(n_train=60, n_eval=20, seed=0)


def test_task_and_family_counts() -> None:
    assert len(TASKS) >= 34
    families = {t.family for t in TASKS.values()}
    assert len(families) >= 6
    assert REQUIRED_FAMILIES <= families
    assert len(WARMUP_TASKS) >= 6


def test_names_are_keys_and_well_formed() -> None:
    for registry in (TASKS, WARMUP_TASKS):
        for name, task in registry.items():
            assert task.name == name
            assert re.fullmatch(r"[a-z0-9_]+", name), name


def test_warmup_disjoint_from_targets() -> None:
    assert not set(WARMUP_TASKS) & set(TASKS)
    target_prompts = {p for t in TASKS.values() for p, _ in _samples(t, 100)}
    warm_prompts = {p for t in WARMUP_TASKS.values() for p, _ in _samples(t, 100)}
    assert not target_prompts & warm_prompts
    # Prompt wordings differ too: compare the fixed text before the input.
    def stems(tasks: dict[str, BuiltinTask]) -> set[str]:
        return {os.path.commonprefix([p for p, _ in _samples(t, 50)]) for t in tasks.values()}

    assert not stems(TASKS) & stems(WARMUP_TASKS)


def test_warmup_mixture_default() -> None:
    mix = builtin_mixture(n_train=5, n_eval=5, warmup=True)
    assert list(mix) == list(WARMUP_TASKS)


def test_lengths_are_small() -> None:
    for registry in (TASKS, WARMUP_TASKS):
        for task in registry.values():
            for prompt, answer in _samples(task, 300):
                assert 0 < len(prompt) <= 40, (task.name, prompt)
                assert 0 < len(answer) <= 16, (task.name, answer)
                assert answer == answer.strip(), (task.name, answer)


def test_schema(mixture: dict) -> None:
    assert list(mixture) == list(TASKS)
    for name, (train, eval_) in mixture.items():
        assert len(train) == 60 and len(eval_) == 20
        ids = [ex["id"] for ex in train + eval_]
        assert len(set(ids)) == len(ids), name
        for ex in train + eval_:
            assert set(ex) == {"id", "source", "messages", "targets"}
            assert ex["source"] == name
            assert re.fullmatch(rf"{name}-\d+", ex["id"])
            roles = [m["role"] for m in ex["messages"]]
            assert roles == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in ex["messages"])
            assert ex["targets"] == [_answer(ex)]
            json.dumps(ex)  # plain JSON-serialisable data


def test_eval_prompts_distinct_and_disjoint_from_train(mixture: dict) -> None:
    for name, (train, eval_) in mixture.items():
        eval_prompts = [_prompt(ex) for ex in eval_]
        assert len(set(eval_prompts)) == len(eval_prompts), name
        assert not set(eval_prompts) & {_prompt(ex) for ex in train}, name


def test_eval_disjoint_at_full_size() -> None:
    for name, (train, eval_) in builtin_mixture(n_train=400, n_eval=100, seed=3).items():
        assert len(train) == 400 and len(eval_) == 100
        assert not {_prompt(e) for e in eval_} & {_prompt(e) for e in train}, name


def test_same_seed_identical_different_seed_differs(mixture: dict) -> None:
    assert builtin_mixture(n_train=60, n_eval=20, seed=0) == mixture
    other = builtin_mixture(n_train=60, n_eval=20, seed=1)
    assert other != mixture
    differing = sum(
        [_prompt(e) for e in mixture[n][1]] != [_prompt(e) for e in other[n][1]] for n in TASKS
    )
    assert differing >= len(TASKS) - 1


def test_eval_set_independent_of_n_train() -> None:
    task = TASKS["reverse"]
    assert make_split(task, 10, 15, seed=4)[1] == make_split(task, 50, 15, seed=4)[1]


def test_deterministic_across_processes() -> None:
    # Guards against salted hash() sneaking into seeding.
    code = (
        "import json;from merit.data.builtin import builtin_mixture;"
        "print(json.dumps(builtin_mixture(['reverse','add','label_size'], n_train=20, n_eval=5, seed=7)))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    outs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1]
    local = builtin_mixture(["reverse", "add", "label_size"], n_train=20, n_eval=5, seed=7)
    assert json.loads(outs[0]) == json.loads(json.dumps(local))


def test_answers_recomputed(mixture: dict) -> None:
    checks = {
        "reverse": lambda p: p.split(": ", 1)[1][::-1],
        "to_upper": lambda p: p.split(": ", 1)[1].upper(),
        "to_lower": lambda p: p.split(": ", 1)[1].lower(),
        "sort_letters": lambda p: "".join(sorted(p.split(": ", 1)[1])),
        "add": lambda p: str(sum(int(x) for x in re.findall(r"\d+", p))),
        "list_max": lambda p: str(max(int(x) for x in re.findall(r"\d+", p))),
        "count_letters": lambda p: str(len(p.split(": ", 1)[1])),
        "to_binary": lambda p: bin(int(p.split()[-1]))[2:],
        "label_parity": lambda p: "odd" if int(p.split()[-1]) % 2 else "even",
        "date_dmy": lambda p: "/".join(reversed(p.split(": ", 1)[1].split("-"))),
    }
    for name, fn in checks.items():
        train, eval_ = mixture[name]
        for ex in train + eval_:
            assert _answer(ex) == fn(_prompt(ex)), (name, ex)


def test_answers_are_deterministic_functions_of_prompt() -> None:
    for task in TASKS.values():
        seen: dict[str, str] = {}
        for prompt, answer in _samples(task, 500):
            assert seen.setdefault(prompt, answer) == answer, (task.name, prompt)


def test_conflict_pairs_share_prompts_and_disagree() -> None:
    assert len(CONFLICT_PAIRS) >= 4
    assert len({n for pair in CONFLICT_PAIRS for n in pair}) == 2 * len(CONFLICT_PAIRS)
    for a, b in CONFLICT_PAIRS:
        assert a in TASKS and b in TASKS
        rng_a, rng_b = random.Random(99), random.Random(99)
        differ = 0
        n = 200
        answers_a, answers_b = set(), set()
        for _ in range(n):
            pa, aa = TASKS[a].generate(rng_a)
            pb, ab = TASKS[b].generate(rng_b)
            assert pa == pb, (a, b)
            differ += aa != ab
            answers_a.add(aa)
            answers_b.add(ab)
        assert differ >= 0.8 * n, (a, b, differ)
        # Systematic: the two tasks' answers are mostly from different sets.
        overlap = len(answers_a & answers_b) / max(1, min(len(answers_a), len(answers_b)))
        assert overlap < 0.5, (a, b, overlap)


def test_max_min_answers_shift_systematically() -> None:
    rng_a, rng_b = random.Random(5), random.Random(5)
    maxes = [int(TASKS["list_max"].generate(rng_a)[1]) for _ in range(200)]
    mins = [int(TASKS["list_min"].generate(rng_b)[1]) for _ in range(200)]
    assert sum(maxes) / 200 - sum(mins) / 200 > 30


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="reverse"):
        builtin_mixture(["reverse", "no_such_task"])
    with pytest.raises(ValueError):
        builtin_mixture(["reverse"], warmup=True)


def test_small_input_space() -> None:
    def gen(rng: random.Random) -> tuple[str, str]:
        d = rng.randint(0, 9)
        return f"Digit {d}", str(d)

    tiny = BuiltinTask(name="tiny", family="test", generate=gen)
    train, eval_ = make_split(tiny, n_train=30, n_eval=4, seed=0)
    assert len(train) == 30 and len(eval_) == 4
    assert not {_prompt(e) for e in eval_} & {_prompt(e) for e in train}
    with pytest.raises(ValueError, match="tiny"):
        make_split(tiny, n_train=1, n_eval=11, seed=0)
    with pytest.raises(ValueError, match="tiny"):
        make_split(tiny, n_train=1, n_eval=10, seed=0)
