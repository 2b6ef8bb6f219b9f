"""Loading θ(0) and its tokenizer from a local Hugging Face checkpoint folder, and choosing the
trainable-parameter subset that gradient estimation and training share."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from merit.errors import MeritError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_checkpoint(folder: str | Path, allow_pickle: bool = False) -> Path:
    """The folder, if it is a checkpoint merit may load; a one-line MeritError saying what to do otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise MeritError(f"{folder}: checkpoint folder not found; check model.path (or the path given)")
    if not folder.is_dir():
        raise MeritError(f"{folder}: is a file; a checkpoint is a folder with config.json and weights")
    if not (folder / "config.json").is_file():
        raise MeritError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MeritError(f"{folder / 'config.json'}: not valid JSON ({e}); re-save the checkpoint") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise MeritError(f"{folder / 'config.json'}: not a transformers model config (no 'model_type')")
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) and not allow_pickle:
            raise MeritError(f"{folder}: weights are pickled (.bin), which can run code when loaded; convert them "
                             "to safetensors or set model.allow_pickle: true if you trust the source")
        if not any(folder.glob("*.bin")):
            raise MeritError(f"{folder}: no weight files (.safetensors)")
    return folder


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer; for a vision-language checkpoint its processor, seen as a tokenizer
    (:class:`merit.models.vlm.ProcessorTokenizer`)."""
    from merit.models import vlm

    if vlm.is_vlm(check_checkpoint(folder, allow_pickle=True)):
        tok = vlm.ProcessorTokenizer(vlm.load_processor(folder, trust_remote_code=trust_remote_code))
        if tok.chat_template is None:
            raise MeritError(f"{folder}: the processor has no chat template; merit tokenizes with the model's template")
        return tok
    tok = AutoTokenizer.from_pretrained(check_checkpoint(folder, allow_pickle=True), trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise MeritError(f"{folder}: the tokenizer has no chat template; merit tokenizes with the model's template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: str | Path, dtype: str = "float32", *, trust_remote_code: bool = False,
               allow_pickle: bool = False, attn_implementation: str = "sdpa"):
    from merit.models.vlm import is_vlm

    folder = check_checkpoint(folder, allow_pickle)
    safetensors = any(folder.glob("*.safetensors"))
    auto = AutoModelForCausalLM
    if is_vlm(folder):  # a config with a vision_config: the image-text-to-text class of its family
        from transformers import AutoModelForImageTextToText as auto
    return auto.from_pretrained(folder, dtype=DTYPES[dtype], use_safetensors=safetensors,
                                trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over the weight files' bytes (sorted by name): the identity of θ(0) in every manifest."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def select_trainable(model, trainable: list[str] | None = None, frozen: list[str] = ()) -> int:
    """Set ``requires_grad`` by name patterns (regular expressions, ``re.search`` on in-memory names).

    Returns the number of trainable parameters. Raises MeritError when nothing is left to train.
    """
    keep = compile_patterns(trainable, "model.trainable") if trainable else None
    drop = compile_patterns(frozen, "model.frozen")
    count = 0
    for name, p in model.named_parameters():
        on = (keep is None or any(k.search(name) for k in keep)) and not any(d.search(name) for d in drop)
        p.requires_grad_(on)
        count += p.numel() if on else 0
    if count == 0:
        raise MeritError(f"model.trainable / model.frozen leave no parameter to train (patterns {trainable} / {list(frozen)})")
    return count


def compile_patterns(patterns, field: str) -> list[re.Pattern]:
    """Regular expressions of a config list; a one-line MeritError naming ``field[i]`` for a bad one."""
    out = []
    for i, p in enumerate(patterns):
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise MeritError(f"{field}[{i}]: {p!r} is not a valid regular expression ({e})") from None
    return out


def meta_model(folder: str | Path, trust_remote_code: bool = False):
    """θ(0)'s architecture on the meta device: every parameter name and shape, no weights, in about a
    second whatever the model's size (what the pre-work checks of ``model.trainable`` look at)."""
    from transformers import AutoConfig

    from merit.models.vlm import is_vlm

    folder = check_checkpoint(folder, allow_pickle=True)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise MeritError(f"{folder / 'config.json'}: transformers cannot read it ({str(e).splitlines()[0]})") from None
    auto = AutoModelForCausalLM
    if is_vlm(folder):
        from transformers import AutoModelForImageTextToText as auto
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def check_trainable(model, model_cfg, lora_cfg=None) -> None:
    """Apply the trainable-subset rules of :func:`load_for_training` to ``model`` (a meta model will do)
    and raise the one-line MeritError a real load would raise later: no parameter left to train, or a
    LoRA target module that no module name ends with."""
    from merit.models import vlm

    is_vlm = vlm.model_family(model) is not None
    if lora_cfg is None:
        frozen = list(model_cfg.frozen)
        if is_vlm and model_cfg.trainable is None:
            frozen = vlm.language_model_only(model, frozen)
        select_trainable(model, model_cfg.trainable, frozen)
        return
    targets = vlm.lora_targets(model, list(lora_cfg.target_modules)) if is_vlm else list(lora_cfg.target_modules)
    modules = [n for n, _ in model.named_modules()]
    for i, t in enumerate(lora_cfg.target_modules):
        if is_vlm or t == "all-linear":
            continue  # resolved to full names by vlm.lora_targets, which refuses names it cannot place
        if not any(n == t or n.endswith("." + t) for n in modules):
            raise MeritError(f"train.lora.target_modules[{i}]: no module of θ(0) is named {t!r} "
                             f"(e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in modules if n})[:8])}, ...)")
    if not targets:
        raise MeritError("train.lora.target_modules: no module of θ(0) matches")


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that both gradient estimation and training update, in iteration order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def load_for_training(folder: str | Path, model_cfg, lora_cfg=None, seed: int = 0, dtype: str | None = None):
    """θ(0) with the trainable subset applied — the one entry point for gradients and for training, so
    both see exactly the same parameters and loss. With ``lora_cfg`` the model is wrapped in PEFT LoRA
    adapters initialised from ``seed`` (the gradient is then over the adapters, as training is).

    A vision-language θ(0) without ``model.trainable`` trains its language model only: the family's
    vision tower and projector patterns (``merit.models.vlm.FAMILIES``) are frozen, and LoRA adapters go
    on language-model layers only. ``dtype`` overrides ``model.dtype`` (``train.precision: bf16-pure``)."""
    from merit.models import vlm

    model = load_model(folder, dtype or model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                       allow_pickle=model_cfg.allow_pickle, attn_implementation=model_cfg.attn_implementation)
    is_vlm = vlm.model_family(model) is not None
    if lora_cfg is None:
        frozen = list(model_cfg.frozen)
        if is_vlm and model_cfg.trainable is None:  # the paper's default: train the language model only
            frozen = vlm.language_model_only(model, frozen)
        select_trainable(model, model_cfg.trainable, frozen)
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # same adapter initialisation for the gradients and every branch
    # On a VLM, adapters go on the language model's layers only (names resolved here: PEFT's suffix
    # matching would also wrap the vision tower's projections).
    targets = vlm.lora_targets(model, list(lora_cfg.target_modules)) if is_vlm else list(lora_cfg.target_modules)
    peft_cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)
