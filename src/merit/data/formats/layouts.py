"""Record layouts: one record of a source, as it comes, turned into merit's chat example.

merit's own layout (``chat``) is ``{"messages": [{"role", "content"}, ...], "images": [...]}``. The others:

- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system"?,
  "images"?}``; ``<image>`` markers in a turn's text place the images (LLaMA-Factory's convention).
- ``llava``: ShareGPT with ``image`` (a path or a list of paths; an image without a marker goes before
  the first human turn's text, as LLaVA's own loader does).
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}``; the
  user turn is ``instruction`` then ``input`` on the next line (LLaMA-Factory's and Alpaca's joining).
- ``cauldron``: The Cauldron's ``{"texts": [{"user", "assistant", "source"?}, ...], "images": [...]}``,
  every image before the first user turn's text (how Idefics2 was trained on it).

Images are file paths (relative to the source's image root) or encoded bytes, either given directly or
as the ``{"bytes", "path"}`` struct that Hugging Face ``datasets`` stores an ``Image`` feature as.

``columns`` maps a layout's field names to the record's (``{"messages": "conversations"}``), as TRL and
LLaMA-Factory allow. Errors name the record (``where``) and the column.
"""

from __future__ import annotations

from merit.errors import DataError

# Each layout's fields and the record columns they are read from by default.
LAYOUTS: dict[str, dict[str, str]] = {
    "chat": {"messages": "messages", "images": "images"},
    "sharegpt": {"messages": "conversations", "system": "system", "images": "images"},
    "llava": {"messages": "conversations", "system": "system", "images": "image"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
               "history": "history", "images": "images"},
    "cauldron": {"messages": "texts", "images": "images"},
}
# Fields kept as they are when present (scoring fields, ids): any layout, mappable too.
PASSTHROUGH = ("id", "source", "choices", "answer_index", "targets")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system"}
MARKER = "<image>"


def fields_of(layout: str) -> tuple[str, ...]:
    return tuple(LAYOUTS[layout]) + PASSTHROUGH


def column_map(layout: str, columns: dict[str, str]) -> dict[str, str]:
    """The layout's field → column names with the user's ``columns`` applied."""
    return {**LAYOUTS[layout], **{f: f for f in PASSTHROUGH}, **columns}


def sniff(record: object) -> str | None:
    """The layout a record looks like by its keys (None: none of them)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "llava" if "image" in record else "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "texts" in record:
        return "cauldron"
    return None


def to_example(layout: str, record: object, where: str, cols: dict[str, str]) -> dict:
    """One record as a chat example (images as given: paths not yet resolved, or bytes).

    Raises:
        DataError: a missing column, a value of the wrong type or an unknown role, naming ``where``
            and the column.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object (a record with named fields), got {type(record).__name__}")
    convert = {"chat": _chat, "sharegpt": _sharegpt, "llava": _sharegpt, "alpaca": _alpaca, "cauldron": _cauldron}
    example = convert[layout](record, where, cols)
    for f in PASSTHROUGH:
        value = record.get(cols[f])
        if value is not None and f not in example:
            example[f] = value
    return example


def _need(record: dict, cols: dict[str, str], field: str, where: str):
    col = cols[field]
    if col not in record or record[col] is None:
        shown = ", ".join(list(record)[:8])
        raise DataError(f"{where}: no column {col!r} (columns: {shown}); map another one with "
                        f"columns: {{{field}: <column>}}")
    return record[col]


def _at(where: str, col: str) -> str:
    return f"{where}, column {col!r}"


def images_of(value: object, where: str) -> list:
    """An images column's value as a list of paths (str) and encoded images (bytes)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        elif isinstance(item, str) and item:
            out.append(item)
        else:
            raise DataError(f"{where}: image {i} must be a path, encoded bytes or {{'bytes', 'path'}}, "
                            f"got {type(item).__name__}")
    return out


def _chat(record: dict, where: str, cols: dict[str, str]) -> dict:
    messages = _need(record, cols, "messages", where)
    if isinstance(messages, list):
        # Arrow stores a list of parts as structs with every field, absent ones as null: drop those.
        messages = [{k: (_parts(v) if k == "content" and isinstance(v, list) else v) for k, v in m.items()
                     if v is not None} if isinstance(m, dict) else m for m in messages]
    # merit's own layout: every other field is kept, as chat JSONL keeps it.
    example = {k: v for k, v in record.items() if k not in (cols["messages"], cols["images"])}
    example["messages"] = messages
    images = record.get(cols["images"])
    if images is not None:
        example["images"] = images_of(images, _at(where, cols["images"]))
    return example


def _parts(parts: list) -> list:
    return [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p for p in parts]


def _sharegpt(record: dict, where: str, cols: dict[str, str]) -> dict:
    col = cols["messages"]
    turns = _need(record, cols, "messages", where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{_at(where, col)}: expected a non-empty list of turns {{'from', 'value'}}")
    messages = []
    system = record.get(cols["system"])
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{_at(where, cols['system'])}: expected a string")
        if system.strip():
            messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{_at(where, col)}: {col}[{j}] must be {{'from': ..., 'value': string}}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise DataError(f"{_at(where, col)}: {col}[{j}].value must be a string, got {type(text).__name__}")
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise DataError(f"{_at(where, col)}: {col}[{j}].from {speaker!r} is not a role merit trains on; "
                            f"expected one of {', '.join(sorted(SHAREGPT_ROLES))}")
        messages.append({"role": role, "content": _marked(text)})
    images = images_of(record.get(cols["images"]), _at(where, cols["images"]))
    return _place_images({"messages": messages}, images, where, cols["images"])


def _alpaca(record: dict, where: str, cols: dict[str, str]) -> dict:
    def text(field: str, required: bool) -> str:
        value = _need(record, cols, field, where) if required else record.get(cols[field])
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{_at(where, cols[field])}: expected a string, got {type(value).__name__}")
        return value

    instruction, query, output, system = text("instruction", True), text("input", False), text("output", True), \
        text("system", False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get(cols["history"]) or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
                                                for h in history):
        raise DataError(f"{_at(where, cols['history'])}: expected a list of [query, answer] string pairs")
    for q, a in history:
        messages += [{"role": "user", "content": _marked(q)}, {"role": "assistant", "content": a}]
    prompt = "\n".join(p for p in (instruction, query) if p)
    messages += [{"role": "user", "content": _marked(prompt)}, {"role": "assistant", "content": output}]
    images = images_of(record.get(cols["images"]), _at(where, cols["images"]))
    return _place_images({"messages": messages}, images, where, cols["images"])


def _cauldron(record: dict, where: str, cols: dict[str, str]) -> dict:
    col = cols["messages"]
    texts = _need(record, cols, "messages", where)
    if not isinstance(texts, list) or not texts:
        raise DataError(f"{_at(where, col)}: expected a non-empty list of {{'user', 'assistant'}} turns")
    messages = []
    for j, turn in enumerate(texts):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("user", "assistant")):
            raise DataError(f"{_at(where, col)}: {col}[{j}] must be {{'user': string, 'assistant': string}}")
        messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["assistant"]}]
    images = images_of(record.get(cols["images"]), _at(where, cols["images"]))
    if images:
        first = messages[0]
        first["content"] = [{"type": "image"} for _ in images] + [{"type": "text", "text": first["content"]}]
        return {"messages": messages, "images": images}
    return {"messages": messages}


def _marked(value: str) -> str | list[dict]:
    """A turn's text with its ``<image>`` markers as image parts (a plain string when it has none)."""
    if MARKER not in value:
        return value
    parts: list[dict] = []
    for i, piece in enumerate(value.split(MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.strip("\n")  # the newline LLaVA puts between the marker and the question
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def _place_images(example: dict, images: list, where: str, col: str) -> dict:
    """Images for marker-placed layouts: markers must match the images; no marker at all puts every
    image before the first user turn's text (LLaVA's rule)."""
    messages = example["messages"]
    markers = sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
    if images and markers == 0:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{_at(where, col)}: an image but no user turn to put it in")
        text = [{"type": "text", "text": first["content"]}] if first["content"].strip() else []
        first["content"] = [{"type": "image"} for _ in images] + text
        markers = len(images)
    if markers != len(images):
        raise DataError(f"{_at(where, col)}: {markers} {MARKER} marker(s) in the turns but {len(images)} image(s)")
    if images:
        example["images"] = images
    return example
