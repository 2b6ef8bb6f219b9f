"""Vision-language checkpoints: detection, processors, and the language-model-only parameter subset.

A checkpoint is a VLM when its ``config.json`` has a ``vision_config``. θ(0) is then loaded with
``AutoModelForImageTextToText`` and its ``AutoProcessor``; the rest of merit sees the processor through
:class:`ProcessorTokenizer`, which behaves like the processor's tokenizer (ids, chat template, padding)
and keeps the processor for the image side.

The paper trains the language model only (vision tower and projector frozen, §1.3 of the paper notes).
:data:`FAMILIES` holds, per ``model_type``, the in-memory parameter names of the parts that stay frozen
and of the language model (saved files use older key names, so names are always taken from the model
in memory — the same names for gradients and for training).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from merit.errors import MeritError


@dataclass(frozen=True)
class VLMFamily:
    """Where the parts of one VLM architecture live, as regular expressions over in-memory names."""

    name: str
    frozen: tuple[str, ...]  # vision tower + projector: frozen by default
    language_model: str  # the decoder's module prefix (LoRA adapters go under it only)


_QWEN = VLMFamily("Qwen2-VL / Qwen2.5-VL", (r"^model\.visual\.",), r"^model\.language_model\.")
_IDEFICS = VLMFamily("Idefics3 / SmolVLM", (r"^model\.vision_model\.", r"^model\.connector\."), r"^model\.text_model\.")
_LLAVA = VLMFamily("LLaVA", (r"^model\.vision_tower\.", r"^model\.multi_modal_projector\."),
                   r"^model\.language_model\.")

FAMILIES: dict[str, VLMFamily] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "llava_onevision": _LLAVA,
}


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_vlm(folder_or_config: str | Path | dict) -> bool:
    """True for a checkpoint folder (or its config dict) with a ``vision_config``."""
    cfg = folder_or_config if isinstance(folder_or_config, dict) else read_config(folder_or_config)
    return cfg.get("vision_config") is not None


def family(model_type: str) -> VLMFamily:
    """The parameter layout of a VLM ``model_type``; a MeritError saying what to set when it is unknown."""
    if model_type not in FAMILIES:
        raise MeritError(f"model: no language-model-only default for VLM type {model_type!r} (known: "
                         f"{', '.join(sorted(FAMILIES))}); set model.trainable to regular expressions over its "
                         "language-model parameter names")
    return FAMILIES[model_type]


def model_family(model) -> VLMFamily | None:
    """The family of a loaded model (unwrapping PEFT), None for a text-only model."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "vision_config", None) is None:
        return None
    return family(config.model_type)


def language_model_only(model, frozen: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The frozen patterns that leave only the language model (+ LM head) trainable, then ``frozen``.

    Raises MeritError when a family pattern matches no parameter (the architecture's names changed),
    which would otherwise silently train the vision tower.
    """
    fam = model_family(model)
    names = [n for n, _ in model.named_parameters()]
    for pattern in fam.frozen:
        if not any(re.search(pattern, n) for n in names):
            raise MeritError(f"model: {fam.name} pattern {pattern!r} matches no parameter of this checkpoint; "
                             "set model.trainable / model.frozen explicitly")
    return [*fam.frozen, *frozen]


def lora_targets(model, modules: list[str]) -> list[str]:
    """Full names of the linear modules under the language model that LoRA wraps.

    ``modules`` are module-name suffixes (``q_proj``) or ``all-linear``; PEFT's own matching would also
    wrap the vision tower's projections (and ``all-linear`` the whole vision tower), so the names are
    resolved here and passed to PEFT explicitly.
    """
    import torch

    prefix = re.compile(model_family(model).language_model)
    every = "all-linear" in modules
    out = []
    for name, module in model.named_modules():
        if not prefix.search(name) or not isinstance(module, torch.nn.Linear):
            continue
        if every or name.rsplit(".", 1)[-1] in modules:
            out.append(name)
    if not out:
        raise MeritError(f"train.lora.target_modules: {modules} match no linear layer of the language model")
    return out


# ---------------------------------------------------------------------------------------------- processors


class MeritQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images only.

    The stock processor builds a video processor, which needs torchvision (not installable beside every
    torch build); merit handles images only. This class name is saved as ``processor_class``: a loader
    without merit does not know it and falls back to the stock processor of the model type.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class MeritQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images only (see :class:`MeritQwen2_5_VLProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


IMAGE_ONLY_PROCESSORS = {"qwen2_5_vl": MeritQwen2_5_VLProcessor, "qwen2_vl": MeritQwen2VLProcessor}


def register_processors() -> None:
    """Register the image-only processors with ``AutoProcessor``, so that ``AutoProcessor.from_pretrained``
    returns them for these model types (without the registration it returns only the tokenizer when the
    stock processor cannot be built)."""
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2VLConfig

    AutoProcessor.register(Qwen2_5_VLConfig, MeritQwen2_5_VLProcessor, exist_ok=True)
    AutoProcessor.register(Qwen2VLConfig, MeritQwen2VLProcessor, exist_ok=True)


def load_processor(folder: str | Path, trust_remote_code: bool = False):
    """The checkpoint's processor (image processor + tokenizer + chat template)."""
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    folder = Path(folder)
    model_type = read_config(folder).get("model_type", "")
    register_processors()
    try:
        if model_type in IMAGE_ONLY_PROCESSORS:
            processor = IMAGE_ONLY_PROCESSORS[model_type].from_pretrained(folder)
        else:
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise MeritError(f"{folder}: cannot load the VLM processor ({str(e).splitlines()[0]})") from None
    if not isinstance(processor, ProcessorMixin) or not hasattr(processor, "image_processor"):
        raise MeritError(f"{folder}: a VLM checkpoint needs its processor files (preprocessor_config.json or "
                         f"processor_config.json); found only {type(processor).__name__}")
    return processor


class ProcessorTokenizer:
    """A VLM processor seen as a tokenizer: every tokenizer attribute comes from ``processor.tokenizer``;
    the chat template and saving come from the processor. Code that handles images checks for
    ``.processor``."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __getattr__(self, name: str):
        # Only called for names not found on the wrapper; during copy/unpickling __dict__ is still empty.
        if "tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["tokenizer"], name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.processor.apply_chat_template(messages, **kwargs)

    def save_pretrained(self, folder, **kwargs):
        return self.processor.save_pretrained(folder, **kwargs)


def processor_of(tokenizer):
    """The processor behind a :class:`ProcessorTokenizer`, None for a plain tokenizer."""
    return getattr(tokenizer, "processor", None) if isinstance(tokenizer, ProcessorTokenizer) else None


# ------------------------------------------------------------------------------------------- saved names


def saved_names(folder: str | Path, names: list[str]) -> dict[str, str]:
    """{in-memory parameter name: key in the saved files} for a checkpoint whose files use older names
    (Qwen2.5-VL saves ``model.language_model.x`` as ``model.x``). Identity for other checkpoints."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.core_model_loading import revert_weight_conversion

    if not is_vlm(folder):
        return {n: n for n in names}
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    out = {}
    for n in names:
        reverted = revert_weight_conversion(model, {n: torch.empty(0, device="meta")})
        out[n] = next(iter(reverted)) if len(reverted) == 1 else n
    return out
