"""Held-out evaluation of one checkpoint.

Per source: multiple-choice examples (``choices`` + ``answer_index``) are scored by the
log-likelihood of each choice after the prompt; the others by exact match of a greedy generation
against any of their ``targets``. Every source also gets the token-mean assistant loss. The
per-source score is MC accuracy or exact match; the macro score is their mean over sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from merit.conflict.estimate import pad_batch, summed_logprob_per_row, summed_token_loss
from merit.data.chat import IGNORE, Tokenized, generation_prompt, tokenize_conversation
from merit.evaluate.scoring import exact_match, is_multiple_choice, pick_choice, targets_of


@dataclass(frozen=True)
class EvalSettings:
    max_length: int = 256
    batch_size: int = 32
    max_new_tokens: int = 24
    normalize: str = "whitespace"
    length_normalized: bool = False


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def assistant_loss(model, tokenizer, examples: list[dict], s: EvalSettings) -> tuple[float, int]:
    """Sum of assistant-token cross entropy (teacher forced, as in training) and the token count."""
    toks = [tokenize_conversation(tokenizer, ex["messages"], s.max_length) for ex in examples]
    toks = sorted((t for t in toks if t.loss_tokens > 0), key=lambda t: len(t.input_ids))
    total, count = 0.0, 0
    for i in range(0, len(toks), s.batch_size):
        loss, n = summed_token_loss(model, _to(pad_batch(toks[i : i + s.batch_size], tokenizer.pad_token_id),
                                               _device(model)))
        total, count = total + float(loss), count + n
    return total, count


@dataclass
class ChoicePass:
    scores: list[tuple[list[float], list[int]]]  # per example: each choice's summed log-probability and tokens
    losses: list[tuple[float, int] | None]  # per example: assistant-token loss sum and count, None if not computed


@torch.no_grad()
def choice_pass(model, tokenizer, examples: list[dict], s: EvalSettings) -> ChoicePass:
    """Multiple-choice scores of ``examples`` and, for most of them, their assistant loss from the same pass.

    Each conversation (prompt + reference answer) is run once: its label positions give the assistant loss,
    the position before the answer scores every choice's first token, and its keys and values up to the
    prompt's end are shared by the choices' later tokens (:func:`_conversation_and_choices`). With C choices
    that is one forward over the prompt instead of C + 1, the bulk of the cost when prompts are long.
    Examples cut by ``max_length`` (the prompt would be cut differently for each choice) and models without a
    key/value cache take one row per choice (:func:`_choice_logprobs_by_row`) and leave their loss to
    :func:`assistant_loss`; both ways give the same numbers up to floating-point rounding.
    """
    prompts = [generation_prompt(tokenizer, ex["messages"])[0] for ex in examples]
    convs = [tokenize_conversation(tokenizer, ex["messages"], s.max_length) for ex in examples]
    choices = [[tokenizer(str(c), add_special_tokens=False)["input_ids"] for c in ex["choices"]] for ex in examples]
    cache_arg = _cache_argument(model)
    shared = [i for i in range(len(examples))
              if cache_arg and prompts[i] and all(choices[i]) and not convs[i].truncated and convs[i].loss_tokens
              and len(prompts[i]) + max(map(len, choices[i])) <= s.max_length]
    scores: list = [None] * len(examples)
    losses: list = [None] * len(examples)
    order = sorted(shared, key=lambda i: len(convs[i].input_ids))  # similar lengths share a batch
    for group in _batches_of_rows(order, [len(choices[i]) for i in order], s.batch_size):
        done = _conversation_and_choices(model, [convs[i] for i in group], [len(prompts[i]) for i in group],
                                         [choices[i] for i in group], tokenizer.pad_token_id, cache_arg)
        if done is None:  # the model returned no cache: every example takes the row path
            break
        for i, (sums, loss) in zip(group, done):
            scores[i], losses[i] = (sums, [len(c) for c in choices[i]]), loss
    rest = [i for i in range(len(examples)) if scores[i] is None]
    for i, v in zip(rest, _choice_logprobs_by_row(model, tokenizer, [examples[i] for i in rest], s)):
        scores[i] = v
    return ChoicePass(scores, losses)


def choice_logprobs(model, tokenizer, examples: list[dict], s: EvalSettings) -> list[tuple[list[float], list[int]]]:
    """Per example: the summed log-probability of each choice's tokens after the prompt, and their counts."""
    return choice_pass(model, tokenizer, examples, s).scores


def _cache_argument(model) -> str | None:
    """The forward's key/value-cache argument (``cache`` from transformers 5.2x, ``past_key_values`` before),
    or None when the forward takes no cache or cannot restrict its logits (``logits_to_keep``)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _batches_of_rows(items: list[int], rows: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of ``items`` holding at most ``limit`` rows in all (one item per group at least),
    so a batch of choices is no larger than a batch of the one-row-per-choice path."""
    groups, current, count = [], [], 0
    for item, n in zip(items, rows):
        if current and count + n > limit:
            groups.append(current)
            current, count = [], 0
        current.append(item)
        count += n
    return groups + [current] if current else groups


def _conversation_and_choices(model, convs: list[Tokenized], prompt_lengths: list[int],
                              choices: list[list[list[int]]], pad_id: int, cache_arg: str = "cache"
                              ) -> list[tuple[list[float], tuple[float, int]]] | None:
    """Per conversation: each choice's summed log-probability after the prompt, and the assistant loss
    (sum, tokens). None when a choice has several tokens and the model returns no cache.

    The conversations run right-padded, each at positions 0..len−1 as it would alone, with logits at their
    label positions and at the prompt's last token (whose next-token distribution scores each choice's first
    token). The cache is repeated once per choice; the choices' later tokens run on top of it at positions
    prompt length + j, attending to the prompt's columns only (the answer's and the padding's are masked)."""
    device = _device(model)
    batch = pad_batch(convs, pad_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows_b = torch.arange(len(convs))
    start = torch.tensor(prompt_lengths)  # each choice's first token sits at its prompt's length
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position i predicts token i+1
    labelled = targets != IGNORE
    keep = labelled.clone()
    keep[rows_b, start - 1] = True
    rows = [(b, c) for b, cs in enumerate(choices) for c in cs]
    longest = max(len(c) for _, c in rows)
    # The cache (rows × width × layers × 2 × kv width) is kept only when a choice has tokens after its first.
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=longest > 1,
                logits_to_keep=keep.to(device))
    cache = next((c for c in (getattr(out, "cache", None), getattr(out, "past_key_values", None)) if c is not None),
                 None)
    if cache is None and longest > 1:
        return None
    logits = out.logits.float()  # (N, V): one row per kept position, in row-major order
    at = (keep.flatten().cumsum(0) - 1).view(keep.shape)  # the logits row of each kept position
    token_logp = -torch.nn.functional.cross_entropy(logits[at[labelled].to(device)], targets[labelled].to(device),
                                                    reduction="none")
    loss = torch.zeros(len(convs), dtype=token_logp.dtype, device=device).index_add_(
        0, labelled.nonzero()[:, 0].to(device), -token_logp)
    first = torch.log_softmax(logits[at[rows_b, start - 1].to(device)], dim=-1)  # (B, V): after each prompt
    owner = torch.tensor([b for b, _ in rows])
    sums = first[owner.to(device), torch.tensor([c[0] for _, c in rows], device=device)]
    if longest > 1:  # the choices' later tokens, predicted from the shared prompt plus the choice so far
        cache.batch_select_indices(owner.to(device))
        cids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        cmask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, (_, c) in enumerate(rows):
            cids[r, : len(c)] = torch.tensor(c)
            cmask[r, : len(c)] = 1
        ctargets = torch.nn.functional.pad(cids[:, 1:], (0, 1), value=pad_id)
        ckeep = torch.nn.functional.pad(cmask[:, 1:], (0, 1)).bool()  # position j predicts the choice's token j+1
        prompt_only = (torch.arange(ids.shape[1]) < start[owner, None]).long()  # not the answer, not the padding
        clogits = model(input_ids=cids.to(device), attention_mask=torch.cat([prompt_only, cmask], 1).to(device),
                        position_ids=(start[owner, None] + torch.arange(longest)).to(device), use_cache=True,
                        logits_to_keep=ckeep.to(device), **{cache_arg: cache}).logits  # (N', V)
        logp = -torch.nn.functional.cross_entropy(clogits.float(), ctargets[ckeep].to(device), reduction="none")
        sums = sums.index_add(0, ckeep.nonzero()[:, 0].to(device), logp)
    values, losses, counts = sums.tolist(), loss.tolist(), labelled.sum(-1).tolist()
    result, r = [], 0
    for b, cs in enumerate(choices):
        result.append((values[r : r + len(cs)], (losses[b], int(counts[b]))))
        r += len(cs)
    return result


@torch.no_grad()
def _choice_logprobs_by_row(model, tokenizer, examples: list[dict], s: EvalSettings
                            ) -> list[tuple[list[float], list[int]]]:
    """One row per example × choice (prompt + choice, cut to ``max_length`` from the left), batched."""
    rows = []  # (example index, Tokenized with labels on the choice tokens only)
    for i, ex in enumerate(examples):
        prompt, _ = generation_prompt(tokenizer, ex["messages"])
        for choice in ex["choices"]:
            ids = tokenizer(str(choice), add_special_tokens=False)["input_ids"]
            seq = (prompt + ids)[-s.max_length :]
            n = min(len(ids), len(seq) - 1)
            rows.append((i, Tokenized(seq, [IGNORE] * (len(seq) - n) + seq[len(seq) - n :], False)))
    sums = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda j: len(rows[j][1].input_ids))  # similar lengths share a batch
    for b in range(0, len(order), s.batch_size):
        idx = order[b : b + s.batch_size]
        batch = _to(pad_batch([rows[j][1] for j in idx], tokenizer.pad_token_id), _device(model))
        for j, v in zip(idx, summed_logprob_per_row(model, batch).tolist()):
            sums[j] = v
    out = [([], []) for _ in examples]
    for (i, t), v in zip(rows, sums):
        out[i][0].append(v)
        out[i][1].append(t.loss_tokens)
    return out


@torch.no_grad()
def generate(model, tokenizer, examples: list[dict], s: EvalSettings, batch_size: int | None = None) -> list[str]:
    """Greedy continuations of each example's prompt (up to its last assistant turn), batched with left padding."""
    batch_size = batch_size or s.batch_size
    prompts = []
    for ex in examples:
        ids, _ = generation_prompt(tokenizer, ex["messages"])
        ids = ids[-s.max_length :]
        prompts.append(Tokenized(ids, ids, False))
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                  for ex in examples for t in targets_of(ex, generation_prompt(tokenizer, ex["messages"])[1]))
    new_tokens = min(s.max_new_tokens, longest + 2)  # no need to generate far past the longest answer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    texts = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = _to(pad_batch([prompts[i] for i in idx], tokenizer.pad_token_id, left=True), _device(model))
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, decoded):
            texts[i] = text
    return texts


def item_scores(examples: list[dict], choose, generate_texts, reference, s: EvalSettings) -> list[float]:
    """Each example's score in input order: 1/0 for the picked choice (multiple choice) or the exact
    match of the greedy generation (the others). ``choose`` and ``generate_texts`` score a list of
    examples; ``reference(ex)`` is the reference answer when an example gives no ``targets``."""
    items = [0.0] * len(examples)
    mc = [i for i, ex in enumerate(examples) if is_multiple_choice(ex)]
    gen = [i for i, ex in enumerate(examples) if not is_multiple_choice(ex)]
    if mc:
        for i, (sums, lengths) in zip(mc, choose([examples[i] for i in mc])):
            items[i] = float(pick_choice(sums, lengths, s.length_normalized) == examples[i]["answer_index"])
    if gen:
        for i, text in zip(gen, generate_texts([examples[i] for i in gen])):
            items[i] = exact_match(text, targets_of(examples[i], reference(examples[i])), s.normalize)
    return items


def source_result(examples: list[dict], items: list[float], loss: float, count: int) -> dict:
    mc = sum(is_multiple_choice(ex) for ex in examples)
    return {"score": sum(items) / len(examples), "metric": "mc_accuracy" if mc >= len(examples) - mc else "exact_match",
            "loss": loss / max(count, 1), "n": len(examples), "items": items}


def evaluate_source(model, tokenizer, examples: list[dict], s: EvalSettings) -> dict:
    if getattr(tokenizer, "processor", None) is not None:  # a VLM: prompts carry images (merit.evaluate.vision)
        from merit.evaluate import vision

        return vision.evaluate_source(model, tokenizer, examples, s)
    mc = [ex for ex in examples if is_multiple_choice(ex)]
    passed = choice_pass(model, tokenizer, mc, s)  # most multiple-choice losses come with their scores
    items = item_scores(examples, lambda exs: passed.scores, lambda exs: generate(model, tokenizer, exs, s),
                        lambda ex: generation_prompt(tokenizer, ex["messages"])[1], s)
    rest = [ex for ex in examples if not is_multiple_choice(ex)] + [ex for ex, l in zip(mc, passed.losses) if l is None]
    total, count = assistant_loss(model, tokenizer, rest, s)
    for loss in filter(None, passed.losses):
        total, count = total + loss[0], count + loss[1]
    return source_result(examples, items, total, count)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def evaluate_model(model, tokenizer, sources: dict[str, list[dict]], settings: EvalSettings, desc: str = "eval",
                   adaptive_batch: bool = False) -> dict:
    """Per-source scores (and each item's) plus the macro score and the macro mean loss over sources.

    ``adaptive_batch``: on out-of-memory, halve the batch size and score the source again (on a GPU,
    ``eval.batch_size: auto`` starts high and settles on the largest size that fits)."""
    from dataclasses import replace

    model.eval()
    per = {}
    for name, examples in tqdm(sources.items(), desc=desc, unit="source", disable=None):
        while True:
            try:
                per[name] = evaluate_source(model, tokenizer, examples, settings)
                break
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not (adaptive_batch and _out_of_memory(e) and settings.batch_size > 1):
                    raise
                torch.cuda.empty_cache()
                settings = replace(settings, batch_size=settings.batch_size // 2)
    return {
        "macro": sum(v["score"] for v in per.values()) / len(per),
        "loss": sum(v["loss"] for v in per.values()) / len(per),
        "per_source": {k: v["score"] for k, v in per.items()},
        "per_source_loss": {k: v["loss"] for k, v in per.items()},
        "metrics": {k: v["metric"] for k, v in per.items()},
        "items": {k: v["items"] for k, v in per.items()},
        "batch_size": settings.batch_size,
    }


def resolve_device(name: str = "auto") -> torch.device:
    """``eval.device``: ``auto`` is the first CUDA GPU when there is one, else the CPU."""
    from merit.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"eval.device: {name} is not available here ({torch.cuda.device_count()} CUDA GPUs); "
                          "use auto or cpu")
    return device


def resolve_dtype(name: str, model_dtype: str, device: torch.device) -> str:
    """``eval.dtype``: ``auto`` keeps ``model.dtype`` on CPU and uses bf16 (fp16 without bf16 support) on a GPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return model_dtype
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def resolve_batch_size(value: int | str, device: torch.device) -> tuple[int, bool]:
    """(batch size, adaptive): ``auto`` is 64 on CPU, 512 halved on out-of-memory on a GPU."""
    if value != "auto":
        return int(value), False
    return (512, True) if device.type == "cuda" else (64, False)


def load_eval_model(folder, dtype: str = "float32", device: torch.device | str | None = None, **kw):
    """A dense model from a checkpoint folder, or from a LoRA adapter folder on top of its base, on ``device``."""
    from pathlib import Path

    from merit.merge.lora import is_adapter
    from merit.models.loading import load_model

    if not is_adapter(Path(folder)):
        model = load_model(folder, dtype, **kw)
    else:
        import json

        from peft import PeftModel

        base = json.loads((Path(folder) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_model(base, dtype, **kw), folder).merge_and_unload()
    return model.to(device) if device is not None else model
