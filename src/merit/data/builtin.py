"""Built-in, code-generated instruction-tuning tasks for a tiny language model.

Every task is a small generator ``rng -> (prompt, answer)`` whose answer is a
deterministic function of the prompt, so evaluation is exact-match.  Prompts
stay within ~40 characters and answers within ~16, which suits a
few-million-parameter, byte-level model trained from scratch on CPU.

Target task families (``TASKS``):

* ``strings``        - reverse, sort letters (both directions), double letters,
                       first/last letter, remove vowels, rotate.
* ``case``           - upper, lower, swap case, capitalize.
* ``arithmetic``     - add, subtract, multiply, double, max/min of a list.
* ``counting``       - letters, vowels, a given letter, digits, words.
* ``classification`` - rule-based yes/no or label answers (parity, palindrome,
                       vowel start, comparison, size).
* ``format``         - comma join, date conversion (two conventions), binary,
                       JSON wrapping.
* ``sequences``      - arithmetic sequences, letter shifts, repeated chars.

Conflict pairs (``CONFLICT_PAIRS``) are tasks that draw their prompt through
the *same* helper, so an identical RNG state yields an identical prompt, yet
they demand contradictory answers.  The contradiction is systematic (upper vs
lower case letters, ascending vs descending order, max vs min, parity words vs
size words, day-first vs month-first dates, shift forward vs backward), so it
does not cancel out when gradients are averaged over many examples.

``WARMUP_TASKS`` are generic copy/format tasks with their own names and
prompt wordings, used to teach the chat format before the target mixture.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "BuiltinTask",
    "TASKS",
    "WARMUP_TASKS",
    "CONFLICT_PAIRS",
    "make_split",
    "builtin_mixture",
]

Generator = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class BuiltinTask:
    name: str  # e.g. "to_upper"  (only [a-z0-9_])
    family: str  # e.g. "case"
    generate: Callable[[random.Random], tuple[str, str]]  # -> (prompt, answer)


TASKS: dict[str, BuiltinTask] = {}
WARMUP_TASKS: dict[str, BuiltinTask] = {}


def _task(registry: dict[str, BuiltinTask], name: str, family: str) -> Callable[[Generator], Generator]:
    def register(fn: Generator) -> Generator:
        if name in registry:
            raise ValueError(f"duplicate task name {name!r}")
        registry[name] = BuiltinTask(name=name, family=family, generate=fn)
        return fn

    return register


def _target(name: str, family: str) -> Callable[[Generator], Generator]:
    return _task(TASKS, name, family)


def _warmup(name: str) -> Callable[[Generator], Generator]:
    return _task(WARMUP_TASKS, name, "warmup")


# ---------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------

LOWER = string.ascii_lowercase
VOWELS = "aeiou"
CONSONANTS = "".join(c for c in LOWER if c not in VOWELS)
# Short real words keep word-level prompts readable; length <= 4 keeps prompts short.
VOCAB = (
    "red fox cat dog sun sky sea tree bird fish blue cold warm ant bee owl "
    "cup pen box hat map car bus egg ice jam kit leaf moon nut oak pig rat "
    "star toy van web yak zoo"
).split()


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))]


def _shift(word: str, k: int) -> str:
    return "".join(LOWER[(LOWER.index(c) + k) % 26] for c in word)


# ---------------------------------------------------------------------------
# Shared prompt helpers for conflict pairs: each returns (prompt, payload) and
# consumes the RNG identically, so both tasks of a pair see the same prompts.
# ---------------------------------------------------------------------------


def _draw_change_case(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(3, 8)))
    return f"Change case: {word}", word


def _draw_sort_letters(rng: random.Random) -> tuple[str, str]:
    # Distinct letters so ascending and descending orders always differ.
    word = "".join(rng.sample(LOWER, rng.randint(3, 7)))
    return f"Sort the letters: {word}", word


def _draw_pick_from(rng: random.Random) -> tuple[str, list[int]]:
    # Distinct numbers so max and min always differ.
    nums = rng.sample(range(100), rng.randint(3, 5))
    return "Pick from: " + " ".join(map(str, nums)), nums


def _draw_label(rng: random.Random) -> tuple[str, int]:
    # 0..999 rather than 0..99 so there are enough distinct prompts.
    n = rng.randint(0, 999)
    return f"Label {n}", n


def _draw_date(rng: random.Random) -> tuple[str, tuple[int, int, int]]:
    y, m, d = rng.randint(1990, 2039), rng.randint(1, 12), rng.randint(1, 28)
    return f"Convert date: {y:04d}-{m:02d}-{d:02d}", (y, m, d)


def _draw_shift(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 7)
    return f"Shift letters: {word}", word


# ---------------------------------------------------------------------------
# strings
# ---------------------------------------------------------------------------


@_target("reverse", "strings")
def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 8)
    return f"Reverse: {word}", word[::-1]


@_target("sort_letters", "strings")
def _sort_letters(rng: random.Random) -> tuple[str, str]:
    prompt, word = _draw_sort_letters(rng)
    return prompt, "".join(sorted(word))


@_target("sort_letters_desc", "strings")
def _sort_letters_desc(rng: random.Random) -> tuple[str, str]:
    prompt, word = _draw_sort_letters(rng)
    return prompt, "".join(sorted(word, reverse=True))


@_target("double_letters", "strings")
def _double_letters(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 7)
    return f"Double each letter: {word}", "".join(c + c for c in word)


@_target("first_letter", "strings")
def _first_letter(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 8)
    return f"First letter of: {word}", word[0]


@_target("last_letter", "strings")
def _last_letter(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 8)
    return f"Last letter of: {word}", word[-1]


@_target("remove_vowels", "strings")
def _remove_vowels(rng: random.Random) -> tuple[str, str]:
    # Force a consonant so the answer is never empty.
    word = list(_word(rng, 3, 8))
    word[rng.randrange(len(word))] = rng.choice(CONSONANTS)
    word_s = "".join(word)
    return f"Remove vowels: {word_s}", "".join(c for c in word_s if c not in VOWELS)


@_target("rotate_left", "strings")
def _rotate_left(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 8)
    return f"Rotate left: {word}", word[1:] + word[0]


# ---------------------------------------------------------------------------
# case
# ---------------------------------------------------------------------------


@_target("to_upper", "case")
def _to_upper(rng: random.Random) -> tuple[str, str]:
    prompt, word = _draw_change_case(rng)
    return prompt, word.upper()


@_target("to_lower", "case")
def _to_lower(rng: random.Random) -> tuple[str, str]:
    prompt, word = _draw_change_case(rng)
    return prompt, word.lower()


@_target("swap_case", "case")
def _swap_case(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(3, 8)))
    return f"Swap case: {word}", word.swapcase()


@_target("capitalize", "case")
def _capitalize(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 8)
    return f"Capitalize: {word}", word.capitalize()


# ---------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------


@_target("add", "arithmetic")
def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"Add {a} and {b}", str(a + b)


@_target("subtract", "arithmetic")
def _subtract(rng: random.Random) -> tuple[str, str]:
    # Draw the subtrahend first so results are never negative.
    b = rng.randint(0, 99)
    a = rng.randint(b, 150)
    return f"Subtract {b} from {a}", str(a - b)


@_target("multiply", "arithmetic")
def _multiply(rng: random.Random) -> tuple[str, str]:
    # One factor up to 40 widens the space beyond a times table (~700 prompts).
    a, b = rng.randint(2, 20), rng.randint(2, 40)
    return f"Multiply {a} by {b}", str(a * b)


@_target("double_number", "arithmetic")
def _double_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Double {n}", str(2 * n)


@_target("list_max", "arithmetic")
def _list_max(rng: random.Random) -> tuple[str, str]:
    prompt, nums = _draw_pick_from(rng)
    return prompt, str(max(nums))


@_target("list_min", "arithmetic")
def _list_min(rng: random.Random) -> tuple[str, str]:
    prompt, nums = _draw_pick_from(rng)
    return prompt, str(min(nums))


# ---------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------


@_target("count_letters", "counting")
def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 1, 12)
    return f"How many letters in: {word}", str(len(word))


@_target("count_vowels", "counting")
def _count_vowels(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 10)
    return f"Count vowels: {word}", str(sum(c in VOWELS for c in word))


@_target("count_char", "counting")
def _count_char(rng: random.Random) -> tuple[str, str]:
    # A 3-letter alphabet makes the target letter appear several times.
    alphabet = "".join(rng.sample(LOWER, 3))
    target = alphabet[0]
    word = _word(rng, 4, 10, alphabet)
    return f"Count the letter {target} in: {word}", str(word.count(target))


@_target("count_digits", "counting")
def _count_digits(rng: random.Random) -> tuple[str, str]:
    text = _word(rng, 3, 10, LOWER[:10] + string.digits)
    return f"Count digits: {text}", str(sum(c.isdigit() for c in text))


@_target("count_words", "counting")
def _count_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 1, 5)
    return "Count words: " + " ".join(words), str(len(words))


# ---------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


@_target("is_even", "classification")
def _is_even(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Is {n} even?", _yes_no(n % 2 == 0)


@_target("is_palindrome", "classification")
def _is_palindrome(rng: random.Random) -> tuple[str, str]:
    # Random words are almost never palindromes, so build one half the time.
    if rng.random() < 0.5:
        half = _word(rng, 1, 4)
        word = half + _word(rng, 0, 1) + half[::-1]
    else:
        word = _word(rng, 3, 8)
    return f"Is it a palindrome: {word}", _yes_no(word == word[::-1])


@_target("starts_with_vowel", "classification")
def _starts_with_vowel(rng: random.Random) -> tuple[str, str]:
    # Choose the first letter's class explicitly to balance the labels.
    first = rng.choice(VOWELS if rng.random() < 0.5 else CONSONANTS)
    word = first + _word(rng, 2, 7)
    return f"Starts with a vowel? {word}", _yes_no(word[0] in VOWELS)


@_target("bigger_than", "classification")
def _bigger_than(rng: random.Random) -> tuple[str, str]:
    # A varying threshold (not a fixed 50) gives ~10k distinct prompts.
    a, b = rng.sample(range(100), 2)
    return f"Is {a} bigger than {b}?", _yes_no(a > b)


@_target("label_parity", "classification")
def _label_parity(rng: random.Random) -> tuple[str, str]:
    prompt, n = _draw_label(rng)
    return prompt, "even" if n % 2 == 0 else "odd"


@_target("label_size", "classification")
def _label_size(rng: random.Random) -> tuple[str, str]:
    prompt, n = _draw_label(rng)
    return prompt, "small" if n < 500 else "large"


# ---------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------


@_target("list_to_csv", "format")
def _list_to_csv(rng: random.Random) -> tuple[str, str]:
    items = [_word(rng, 1, 2) for _ in range(rng.randint(2, 5))]
    return "Join with commas: " + " ".join(items), ",".join(items)


@_target("date_dmy", "format")
def _date_dmy(rng: random.Random) -> tuple[str, str]:
    prompt, (y, m, d) = _draw_date(rng)
    return prompt, f"{d:02d}/{m:02d}/{y:04d}"


@_target("date_mdy", "format")
def _date_mdy(rng: random.Random) -> tuple[str, str]:
    prompt, (y, m, d) = _draw_date(rng)
    return prompt, f"{m:02d}/{d:02d}/{y:04d}"


@_target("to_binary", "format")
def _to_binary(rng: random.Random) -> tuple[str, str]:
    # Up to 1023 (not 255) so there are enough distinct prompts.
    n = rng.randint(0, 1023)
    return f"Binary of {n}", format(n, "b")


@_target("wrap_json", "format")
def _wrap_json(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 6)
    return f"Wrap as JSON: {word}", '{"w":"' + word + '"}'


# ---------------------------------------------------------------------------
# sequences
# ---------------------------------------------------------------------------


@_target("continue_sequence", "sequences")
def _continue_sequence(rng: random.Random) -> tuple[str, str]:
    start, step, shown = rng.randint(0, 60), rng.randint(1, 15), rng.randint(3, 4)
    terms = [start + i * step for i in range(shown + 1)]
    return "Continue: " + " ".join(map(str, terms[:-1])), str(terms[-1])


@_target("shift_forward", "sequences")
def _shift_forward(rng: random.Random) -> tuple[str, str]:
    # Each letter becomes the next letter of the alphabet (z wraps to a).
    prompt, word = _draw_shift(rng)
    return prompt, _shift(word, 1)


@_target("shift_backward", "sequences")
def _shift_backward(rng: random.Random) -> tuple[str, str]:
    prompt, word = _draw_shift(rng)
    return prompt, _shift(word, -1)


@_target("next_letter", "sequences")
def _next_letter(rng: random.Random) -> tuple[str, str]:
    # Letter runs with a step of 1-3 and either case: consecutive runs alone
    # would give fewer than 200 distinct prompts.
    alphabet = rng.choice([string.ascii_lowercase, string.ascii_uppercase])
    step, length = rng.randint(1, 3), rng.randint(2, 6)
    start = rng.randint(0, 25 - step * length)
    run = alphabet[start : start + step * (length + 1) : step]
    return "Next letter: " + " ".join(run[:-1]), run[-1]


@_target("repeat_char", "sequences")
def _repeat_char(rng: random.Random) -> tuple[str, str]:
    # Both cases and counts up to 14 give ~680 distinct prompts.
    ch, n = rng.choice(string.ascii_letters), rng.randint(2, 14)
    return f"Write {ch} {n} times", ch * n


CONFLICT_PAIRS: list[tuple[str, str]] = [
    ("to_upper", "to_lower"),
    ("sort_letters", "sort_letters_desc"),
    ("list_max", "list_min"),
    ("label_parity", "label_size"),
    ("date_dmy", "date_mdy"),
    ("shift_forward", "shift_backward"),
]


# ---------------------------------------------------------------------------
# warm-up tasks (generic copying / chat format)
# ---------------------------------------------------------------------------


@_warmup("say")
def _say(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 1, 8)
    return f"Say: {word}", word


@_warmup("repeat_number")
def _repeat_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 9999)
    return f"Repeat the number {n}", str(n)


@_warmup("spell")
def _spell(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 6)
    return f"Spell: {word}", " ".join(word)


@_warmup("echo_list")
def _echo_list(rng: random.Random) -> tuple[str, str]:
    items = " ".join(rng.choice(LOWER + string.digits) for _ in range(rng.randint(2, 6)))
    return f"Echo the list: {items}", items


@_warmup("last_word")
def _last_word(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    return "What is the last word: " + " ".join(words), words[-1]


@_warmup("first_word")
def _first_word(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    return "What is the first word: " + " ".join(words), words[0]


@_warmup("word_length")
def _word_length(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 1, 9)
    return f"How long is the word: {word}", str(len(word))


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------

# Consecutive failed draws after which an input space counts as exhausted.
_MAX_MISSES = 200


def _example(task: BuiltinTask, i: int, prompt: str, answer: str) -> dict:
    return {
        "id": f"{task.name}-{i}",
        "source": task.name,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        "targets": [answer],
    }


def make_split(task: BuiltinTask, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval examples for one task; eval prompts never occur in train.

    Eval is drawn first (``n_eval`` distinct prompts, ids ``0..n_eval-1``) so
    the eval set does not depend on ``n_train``; train ids continue from
    ``n_eval``.  Train prompts are distinct while the input space allows and
    may repeat (never matching an eval prompt) once it is exhausted.

    Each example: {"id": f"{task.name}-{i}", "source": task.name,
                   "messages": [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": answer}],
                   "targets": [answer]}
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be non-negative")
    # A string seed is hashed deterministically by random.Random (unlike hash()).
    rng = random.Random(f"{seed}:{task.name}")

    eval_pairs: dict[str, str] = {}
    misses = 0
    while len(eval_pairs) < n_eval:
        prompt, answer = task.generate(rng)
        if prompt in eval_pairs:
            misses += 1
            if misses > _MAX_MISSES:
                raise ValueError(
                    f"task {task.name!r} could only produce {len(eval_pairs)} distinct eval prompts "
                    f"(wanted {n_eval}); its input space is too small"
                )
            continue
        misses = 0
        eval_pairs[prompt] = answer

    train_pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    exhausted = False
    misses = 0
    while len(train_pairs) < n_train:
        prompt, answer = task.generate(rng)
        if prompt in eval_pairs or (prompt in seen and not exhausted):
            misses += 1
            if misses > _MAX_MISSES:
                if exhausted or not seen:
                    raise ValueError(
                        f"task {task.name!r} cannot produce train prompts outside its eval set"
                    )
                # Small input space: allow repeats within train from here on.
                exhausted = True
                misses = 0
            continue
        misses = 0
        seen.add(prompt)
        train_pairs.append((prompt, answer))

    eval_set = [_example(task, i, p, a) for i, (p, a) in enumerate(eval_pairs.items())]
    train = [_example(task, n_eval + i, p, a) for i, (p, a) in enumerate(train_pairs)]
    return train, eval_set


def builtin_mixture(
    names: list[str] | None = None,
    n_train: int = 200,
    n_eval: int = 50,
    seed: int = 0,
    warmup: bool = False,
) -> dict[str, tuple[list[dict], list[dict]]]:
    """{task name: (train, eval)} for the named tasks.

    Defaults to all of TASKS, or all of WARMUP_TASKS if ``warmup``.  Unknown
    name -> ValueError listing the known ones.
    """
    registry = WARMUP_TASKS if warmup else TASKS
    if names is None:
        names = list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        kind = "warm-up" if warmup else "target"
        raise ValueError(f"unknown {kind} task(s) {unknown}; known: {sorted(registry)}")
    return {n: make_split(registry[n], n_train, n_eval, seed) for n in names}
