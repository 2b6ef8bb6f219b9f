"""Examples with images: validation of image references, tokenization through a VLM processor with
assistant-only loss masks, and the collator that hands pixels to the model.

Schema. A message's ``content`` is a string or a list of parts ``{"type": "image"}`` /
``{"type": "text", "text": ...}``; the example's ``images`` lists one image per image part, in order of
appearance: a path relative to the mixture folder (the folder holding ``train/`` and ``eval/``; for a
file elsewhere, its own folder) or absolute, or encoded bytes (images embedded in Parquet / Arrow
sources). :func:`resolve_images` makes paths absolute when the file is read, so every later stage can
open them wherever it runs.

Tokenization mirrors ``merit.data.chat`` (render the prefix before each assistant turn and through it,
compare ids) but goes through ``processor(text, images)``, so image placeholders are expanded exactly as
the model expects. Pixels are not kept in memory: the collator loads each batch's images from disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from merit.data.chat import IGNORE, TemplateError, Tokenized
from merit.errors import DataError

if TYPE_CHECKING:  # torch is imported where batches are built, so reading data files stays light
    import torch

# Processor outputs that are per-token sequences besides input_ids / attention_mask (Qwen-VL's
# mm_token_type_ids drive its 3-D rotary positions); padded with 0 like the attention mask.
_TEXT_KEYS = ("input_ids", "attention_mask")


@dataclass
class VisionTokenized(Tokenized):
    """A tokenized example of a VLM: ids and labels as for text, plus its image files (absolute paths)
    and the processor's other per-token fields (e.g. ``mm_token_type_ids``)."""

    images: tuple[str | bytes, ...] = ()  # absolute paths, or encoded images
    extra: dict[str, list[int]] = field(default_factory=dict)
    image_tokens: int = 0  # placeholder tokens that the image features replace


# ---------------------------------------------------------------------------------------------- schema


def has_parts(example: dict) -> bool:
    """True when any message's content is a list of parts, or the example names images."""
    return "images" in example or any(isinstance(m.get("content"), list) for m in example.get("messages", ()))


def check_parts(messages: list, where: str) -> int:
    """Validate list contents; the number of image parts. One-line DataError naming ``where``."""
    images = 0
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise DataError(f"{where}: messages[{i}].content must be a string or a non-empty list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{where}: messages[{i}].content[{j}] must be {{'type': 'image'}} or "
                                "{'type': 'text', 'text': string}")
    return images


def mixture_root(jsonl: Path) -> Path:
    """The folder image paths are relative to: the folder above ``train/`` / ``eval/``, else the file's."""
    jsonl = Path(jsonl)
    return jsonl.parent.parent if jsonl.parent.name in ("train", "eval") else jsonl.parent


def resolve_images(example: dict, root: Path, where: str, n_parts: int) -> None:
    """Check ``images`` against the image parts and make each path absolute (relative ones are under
    ``root``), in place. Encoded images (bytes, from Parquet or Arrow sources) stay bytes, checked.

    Raises:
        DataError: ``images`` is not a list of paths / bytes, its length differs from the number of image
            parts, or an image does not exist or cannot be read — naming ``where`` and the image.
    """
    images = example.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, (str, bytes)) for p in images):
        raise DataError(f"{where}: 'images' must be a list of image file paths")
    if len(images) != n_parts:
        raise DataError(f"{where}: {n_parts} image part(s) in 'messages' but {len(images)} path(s) in 'images'")
    out = []
    for i, p in enumerate(images):
        if isinstance(p, bytes):
            check_image(p, where, f"image {i} (encoded bytes)")
            out.append(p)
            continue
        full = Path(p).expanduser()
        full = full if full.is_absolute() else Path(root) / full
        if not full.is_file():
            raise DataError(f"{where}: image not found: {full}")
        check_image(full, where)
        out.append(str(full.resolve()))
    example["images"] = out


def check_image(image: Path | bytes, where: str, name: str | None = None) -> None:
    """Refuse a file (or encoded bytes) that is not a readable image, from its header alone (cheap: no
    pixels decoded), so a bad image fails when the data is read, not hours later in a training batch."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_image_source(image)) as img:
            if not img.size or min(img.size) < 1:
                raise OSError("empty image")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{where}: {name or f'image {image}'} cannot be read ({type(e).__name__}: {e}); "
                        "replace or remove it") from None


def _image_source(image: str | Path | bytes):
    import io

    return io.BytesIO(image) if isinstance(image, bytes) else image


def image_parts(messages: Sequence[dict]) -> int:
    """How many image parts the messages hold (each takes the next file of ``images``)."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "image")


def load_image(image: str | bytes):
    """An image file (or encoded bytes) as RGB (what every VLM image processor expects)."""
    from PIL import Image

    try:
        with Image.open(_image_source(image)) as img:
            return img.convert("RGB")
    except OSError as e:
        name = "encoded image" if isinstance(image, bytes) else image
        raise DataError(f"{name}: cannot read image ({e})") from None


# -------------------------------------------------------------------------------------------- tokenizing


@contextlib.contextmanager
def _reuse_image_features(processor) -> Iterator[None]:
    """Within the block, the processor computes the features of a given list of images once.

    Masks need several renderings of one conversation (before and through each assistant turn), each
    with the same images; recomputing pixels for each would cost as much as the rest of tokenization.
    """
    original = getattr(processor, "_process_images", None)
    if original is None:
        yield
        return
    cache: dict[tuple[int, ...], object] = {}

    def cached(images, **kwargs):
        key = tuple(id(x) for x in images) if isinstance(images, (list, tuple)) else (id(images),)
        if key not in cache:
            cache[key] = original(images, **kwargs)
        return cache[key]

    processor._process_images = cached
    try:
        yield
    finally:
        del processor._process_images  # back to the class's method


def encode(processor, messages: list[dict], images: list, add_generation_prompt: bool = False) -> dict:
    """Processor output (lists) for the conversation rendered by the chat template, with the images of
    the rendered messages."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    n = image_parts(messages)
    kwargs = {"images": images[:n]} if n else {}
    out = processor(text=[text], add_special_tokens=False, **kwargs)
    return {k: list(v[0]) for k, v in out.items()
            if isinstance(v, list) and len(v) == 1 and isinstance(v[0], list)}


def image_token_ids(processor) -> set[int]:
    """Ids of the placeholder token(s) that the processor expands and the model replaces by image features."""
    ids = set()
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    token = getattr(processor, "image_token", None)
    if isinstance(token, str):
        tid = processor.tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != processor.tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def tokenize_vision_conversation(processor, messages: list[dict], images: Sequence[str],
                                 max_length: int) -> VisionTokenized:
    """Ids of the whole conversation, labels on assistant turns only, through the processor.

    As ``merit.data.chat.tokenize_conversation``: each assistant span runs from the end of the prefix
    rendered with a generation prompt to the end of the conversation rendered through that turn.
    Truncation cuts at the end; if it would cut into an image's placeholder tokens (the model needs
    all of them), every label is dropped and the caller skips the example.
    """
    pil = [load_image(p) for p in images]
    with _reuse_image_features(processor):
        full = encode(processor, messages, pil)
        ids = full["input_ids"]
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = encode(processor, messages[:i], pil, add_generation_prompt=True)["input_ids"]
            through = encode(processor, messages[: i + 1], pil)["input_ids"]
            if through[: len(prefix)] != prefix or ids[: len(through)] != through:
                raise TemplateError("chat template is not prefix-consistent at assistant turn %d" % i)
            labels[len(prefix) : len(through)] = ids[len(prefix) : len(through)]
    image_ids = image_token_ids(processor)
    truncated = len(ids) > max_length
    if truncated and any(x in image_ids for x in ids[max_length:]):
        labels = [IGNORE] * len(ids)
    extra = {k: v[:max_length] for k, v in full.items() if k not in _TEXT_KEYS and len(v) == len(ids)}
    return VisionTokenized(ids[:max_length], labels[:max_length], truncated, images=tuple(images), extra=extra,
                           image_tokens=sum(1 for x in ids[:max_length] if x in image_ids))


def prompt_for_generation(processor, messages: list[dict], images: Sequence[str]) -> tuple[VisionTokenized, str]:
    """The prompt up to the last assistant turn (with the generation prompt), as a VisionTokenized whose
    labels are the ids (unused), and that turn's reference text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    n = image_parts(messages[:last])
    enc = encode(processor, messages[:last], [load_image(p) for p in images[:n]], add_generation_prompt=True)
    ids = enc["input_ids"]
    extra = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and len(v) == len(ids)}
    return VisionTokenized(ids, list(ids), False, images=tuple(images[:n]), extra=extra), text_of(messages[last])


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


# ---------------------------------------------------------------------------------------------- batching


class VisionDataset:
    """Tokenized examples as they are (a map-style dataset); :class:`VisionCollator` builds the tensors."""

    def __init__(self, examples: list[Tokenized]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Tokenized:
        return self.examples[int(i)]


class VisionCollator:
    """(B, L) ``input_ids`` / ``attention_mask`` / ``labels`` (and other per-token fields) padded to the
    longest example, plus the image processor's tensors for the batch's images (loaded from disk here):
    for Qwen-VL ``pixel_values`` (all patches of all images, concatenated) and ``image_grid_thw``."""

    def __init__(self, processor, pad_id: int, left: bool = False):
        self.processor, self.pad_id, self.left = processor, pad_id, left

    def __call__(self, batch: list[Tokenized]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(t.input_ids) for t in batch)
        keys = sorted({k for t in batch for k in getattr(t, "extra", {})})
        out = {"input_ids": torch.full((len(batch), width), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
               "labels": torch.full((len(batch), width), IGNORE, dtype=torch.long),
               **{k: torch.zeros((len(batch), width), dtype=torch.long) for k in keys}}
        for i, t in enumerate(batch):
            n = len(t.input_ids)
            sl = slice(width - n, width) if self.left else slice(0, n)
            out["input_ids"][i, sl] = torch.tensor(t.input_ids)
            out["attention_mask"][i, sl] = 1
            out["labels"][i, sl] = torch.tensor(t.labels)
            for k, v in getattr(t, "extra", {}).items():
                out[k][i, sl] = torch.tensor(v)
        # Images grouped per example (the layout every image processor accepts); examples without
        # images contribute none.
        per_example = [[load_image(p) for p in getattr(t, "images", ())] for t in batch]
        per_example = [imgs for imgs in per_example if imgs]
        if per_example:
            pixels = self.processor.image_processor(images=per_example, return_tensors="pt")
            out.update({k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)})
        return out


def collator_for(tokenizer, left: bool = False) -> VisionCollator | None:
    """The collator for a VLM's :class:`~merit.models.vlm.ProcessorTokenizer`; None for a text tokenizer."""
    from merit.models.vlm import processor_of

    processor = processor_of(tokenizer)
    return None if processor is None else VisionCollator(processor, tokenizer.pad_token_id, left=left)
