"""Source formats (merit.data.formats): every reader gives exactly the tokens, labels and counts of the
same examples written as chat JSONL; slices; shards; bad input named by file, row and column; a mixture
of formats end to end."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import yaml

from conftest import FAMILIES, chat, word, write_jsonl
from merit import artifacts
from merit.cli import main
from merit.data import formats, tokens
from merit.data.formats import ReadSpec
from test_bad_input import no_stage_written, one_error, run_cli

# ------------------------------------------------------------------------------------------- the data


def _pairs(n: int, family: str = "upper_copy", seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(f"{family}{seed}")
    return [FAMILIES[family](word(rng)) for _ in range(n)]


def _system_chat(q: str, a: str, i: int) -> dict:
    """A chat example with a system turn every third example and two exchanges every fourth."""
    messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
    if i % 4 == 0:
        messages += [{"role": "user", "content": "warm up"}, {"role": "assistant", "content": "ok"}]
    return {"id": str(i), "messages": messages + chat(q, a)["messages"]}


def _sharegpt(ex: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"id": ex["id"], "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in ex["messages"]]}


def _alpaca(q: str, a: str, i: int) -> tuple[dict, dict]:
    """An Alpaca record and the chat example it stands for (instruction and input on two lines)."""
    instruction, query = q.split(": ", 1)
    record = {"instruction": instruction + ":", "input": query if i % 2 else "", "output": a}
    prompt = record["instruction"] + ("\n" + query if i % 2 else "")
    return record, {"messages": chat(prompt, a)["messages"]}


def _parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)
    return path


def _tokens_of(reader, tokenizer, root: Path, max_length: int = 64):
    req = tokens.request("s", reader, root, tokens.tokenizer_identity(tokenizer), "same", max_length, None)
    tokens.build([req], tokenizer)
    return tokens.open_tokens(req), tokens.read_index(req)


def _same_tokens(a, b) -> None:
    (ta, ia), (tb, ib) = a, b
    assert len(ta) == len(tb) > 0
    for x, y in zip(ta, tb):
        assert x.input_ids == y.input_ids and x.labels == y.labels and x.truncated == y.truncated
        assert getattr(x, "image_tokens", 0) == getattr(y, "image_tokens", 0)
    for k in ("examples", "rows", "tokens", "loss_tokens", "truncated", "skipped"):
        assert ia[k] == ib[k], k


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from merit.models.loading import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


# --------------------------------------------------------------------------------- text formats = JSONL


def _write_format(kind: str, root: Path, examples: list[dict]) -> tuple[Path, str | None, dict]:
    """The same chat examples stored as ``kind``; (path, format to declare or None, columns)."""
    if kind == "parquet":
        return _parquet(root / "s.parquet", examples, row_group_size=7), None, {}
    if kind == "save_to_disk":
        from datasets import Dataset

        Dataset.from_list(examples).save_to_disk(str(root / "saved"), max_shard_size="2KB")
        return root / "saved", None, {}
    if kind == "hub":
        _parquet(root / "hub" / "data" / "train-00000-of-00002.parquet", examples[:20])
        _parquet(root / "hub" / "data" / "train-00001-of-00002.parquet", examples[20:])
        _parquet(root / "hub" / "data" / "test-00000-of-00001.parquet", examples[:3])
        return root / "hub", "hf-dataset", {}
    if kind == "sharegpt-json":
        (root / "sg.json").write_text(json.dumps([_sharegpt(e) for e in examples], indent=1))
        return root / "sg.json", None, {}
    if kind == "sharegpt-jsonl-mapped":  # another column name, mapped
        rows = [{"id": e["id"], "dialog": _sharegpt(e)["conversations"]} for e in examples]
        return write_jsonl(root / "sg.jsonl", rows), "sharegpt", {"messages": "dialog"}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "hub", "sharegpt-json", "sharegpt-jsonl-mapped"])
def test_text_formats_tokenize_as_the_same_chat_jsonl(tmp_path, tokenizer, kind):
    examples = [_system_chat(q, a, i) for i, (q, a) in enumerate(_pairs(40))]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", examples)
    path, fmt, columns = _write_format(kind, tmp_path, examples)
    reader = formats.open_reader(ReadSpec(path, fmt, tuple(columns.items())))
    assert not reader.plain_jsonl
    assert [ex["messages"] for _, ex in formats.examples(reader)] == [e["messages"] for e in examples]
    assert formats.count_examples(reader) == 40
    _same_tokens(_tokens_of(reader, tokenizer, tmp_path / "a"),
                 _tokens_of(formats.open_reader(ReadSpec(jsonl)), tokenizer, tmp_path / "b"))


def test_alpaca_tokenizes_as_the_same_chat_jsonl(tmp_path, tokenizer):
    pairs = [_alpaca(q, a, i) for i, (q, a) in enumerate(_pairs(12))]
    records, examples = zip(*pairs)
    (tmp_path / "alpaca.json").write_text(json.dumps(list(records)))
    reader = formats.open_reader(ReadSpec(tmp_path / "alpaca.json"))
    assert reader.layout == "alpaca"
    _same_tokens(_tokens_of(reader, tokenizer, tmp_path / "a"),
                 _tokens_of(formats.open_reader(ReadSpec(write_jsonl(tmp_path / "c.jsonl", list(examples)))),
                            tokenizer, tmp_path / "b"))


# ------------------------------------------------------------------------------------------ slices, shards


def test_split_filter_and_max_rows_slice_a_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [dict(chat(f"q{i}", f"a{i}"), task=["ai2d", "vqa", "ocr"][i % 3], level=i % 2) for i in range(30)]
    DatasetDict({"train": Dataset.from_list(rows[:24]), "test": Dataset.from_list(rows[24:])}).save_to_disk(
        str(tmp_path / "dd"))
    spec = ReadSpec(tmp_path / "dd", split="train", filter=(("task", ("vqa", "ocr")), ("level", (1,))), max_rows=3)
    got = [ex["messages"][0]["content"] for _, ex in formats.examples(formats.open_reader(spec))]
    assert got == [f"q{i}" for i in range(24) if i % 3 and i % 2][:3] == ["q1", "q5", "q7"]
    assert formats.count_examples(formats.open_reader(spec)) == 3
    test = formats.open_reader(ReadSpec(tmp_path / "dd", split="test"))
    assert [ex["id"] if "id" in ex else ex["messages"][0]["content"] for _, ex in formats.examples(test)] == \
        [f"q{i}" for i in range(24, 30)]


@pytest.mark.parametrize("kind", ["parquet", "json", "save_to_disk"])
def test_shards_cover_every_kept_row_once(tmp_path, monkeypatch, kind):
    examples = [dict(chat(f"question {i} " + "x" * 50, f"a{i}"), keep=i % 5 != 0) for i in range(200)]
    if kind == "parquet":
        path = _parquet(tmp_path / "s.parquet", examples, row_group_size=16)
    elif kind == "json":
        path = tmp_path / "s.json"
        path.write_text(json.dumps(examples, indent=2))
    else:
        from datasets import Dataset

        Dataset.from_list(examples).save_to_disk(str(tmp_path / "d"), max_shard_size="8KB")
        path = tmp_path / "d"
    reader = formats.open_reader(ReadSpec(path, filter=(("keep", (True,)),), max_rows=150))
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 2000)
    shards = formats.plan_shards(reader, limit=140)
    assert len(shards) > 3
    pieces = [ex["messages"][0]["content"] for s in shards for _, ex in formats.shard_examples(reader, s)]
    whole = [ex["messages"][0]["content"] for _, ex in formats.examples(reader, limit=140)]
    assert pieces == whole and len(whole) == 140
    assert whole[:2] == ["question 1 " + "x" * 50, "question 2 " + "x" * 50]


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"instruction": "x", "output": "y"},\n {"instruction": "x", "output": }\n]')
    with pytest.raises(Exception, match=r"a.json:3: not valid JSON"):
        list(formats.examples(formats.open_reader(ReadSpec(path))))
    path.write_text('[{"instruction": "x", "output": "y"}')
    with pytest.raises(Exception, match="not closed"):
        list(formats.examples(formats.open_reader(ReadSpec(path))))


# ------------------------------------------------------------------------------------------ VLM formats


def _png(colour: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_embedded_images_and_llava_tokenize_as_chat_jsonl_with_image_files(tmp_path, tiny_vlm_checkpoint):
    from merit.data.vision import VisionCollator
    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_vlm_checkpoint)
    colours = ["red", "blue", "green", "yellow"] * 3
    (tmp_path / "images").mkdir()
    chat_rows, cauldron, llava = [], [], []
    for i, c in enumerate(colours):
        data = _png(c)
        (tmp_path / "images" / f"{i}.png").write_bytes(data)
        q, a = "What colour is the shape?", c
        chat_rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                                       {"role": "assistant", "content": a}], "images": [f"images/{i}.png"]})
        cauldron.append({"images": [{"bytes": data, "path": None}], "texts": [{"user": q, "assistant": a, "source": "t"}]})
        llava.append({"id": str(i), "image": f"{i}.png",
                      "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    jsonl = write_jsonl(tmp_path / "chat.jsonl", chat_rows)  # paths relative to the file's folder
    _parquet(tmp_path / "cauldron.parquet", cauldron, row_group_size=5)
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    expected = _tokens_of(formats.open_reader(ReadSpec(jsonl)), tok, tmp_path / "t0", max_length=48)
    embedded = _tokens_of(formats.open_reader(ReadSpec(tmp_path / "cauldron.parquet")), tok, tmp_path / "t1", 48)
    paths = _tokens_of(formats.open_reader(ReadSpec(tmp_path / "llava.json", "llava",
                                                    image_root=str(tmp_path / "images"))), tok, tmp_path / "t2", 48)
    _same_tokens(embedded, expected)
    _same_tokens(paths, expected)
    assert expected[1]["images"] == embedded[1]["images"] == 12
    assert isinstance(embedded[0][0].images[0], bytes) and isinstance(expected[0][0].images[0], str)
    # the collator decodes embedded bytes into the same pixels as the files
    collate = VisionCollator(tok.processor, tok.pad_token_id)
    a, b = collate([embedded[0][i] for i in range(4)]), collate([expected[0][i] for i in range(4)])
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


# -------------------------------------------------------------------------------------------- the CLI


def test_convert_writes_embedded_images_as_files(tmp_path, capsys):
    rows = [{"images": [{"bytes": _png(c), "path": None}], "texts": [{"user": "Colour?", "assistant": c}], "task": t}
            for c, t in (("red", "a"), ("blue", "b"), ("green", "a"))]
    src = _parquet(tmp_path / "c.parquet", rows)
    out = tmp_path / "mix" / "train" / "colours.jsonl"
    assert main(["convert", str(src), "--out", str(out), "--filter", "task=a"]) == 0
    assert "2 examples, 2 images" in capsys.readouterr().out
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][1]["content"] for r in written] == ["red", "green"]
    assert written[0]["images"] == ["images/colours/0000000-0.png"]
    assert (tmp_path / "mix" / written[0]["images"][0]).read_bytes() == rows[0]["images"][0]["bytes"]
    assert not list((tmp_path / "mix").rglob(".*tmp*"))


# ----------------------------------------------------------------------------------------- bad input


def _bad_parquet_image(root: Path) -> tuple[Path, dict]:
    rows = [{"images": [{"bytes": _png("red"), "path": None}], "texts": [{"user": "q", "assistant": "a"}]},
            {"images": [{"bytes": b"not an image", "path": None}], "texts": [{"user": "q", "assistant": "a"}]}]
    return _parquet(root / "bad.parquet", rows), {}


def _saved_without_messages(root: Path) -> tuple[Path, dict]:
    from datasets import Dataset

    Dataset.from_list([{"prompt": "q", "answer": "a"}] * 3).save_to_disk(str(root / "saved"))
    return root / "saved", {}


def _llava_missing_image(root: Path) -> tuple[Path, dict]:
    (root / "im").mkdir()
    (root / "im" / "0.png").write_bytes(_png("red"))
    records = [{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]} for i in range(2)]
    (root / "llava.json").write_text(json.dumps(records))
    return root / "llava.json", {"format": "llava", "image_root": str(root / "im")}


BAD = {
    "missing column": (lambda root: (write_jsonl(root / "sg.jsonl", [_sharegpt(_system_chat("q", "a", 1))]),
                                     {"format": "sharegpt", "columns": {"messages": "dialog"}}),
                       ["sg.jsonl:1", "no column 'dialog'"]),
    "wrong type": (lambda root: (root.joinpath("al.json").write_text(json.dumps(
        [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": 3}])) and root / "al.json", {}),
                   ["al.json: row 1 (line 1), column 'output': expected a string, got int"]),
    "unknown role": (lambda root: (_parquet(root / "sg.parquet", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}]), {}),
                     ["sg.parquet: row 1, column 'conversations': conversations[1].from 'robot' is not a role"]),
    "undecodable image": (_bad_parquet_image, ["bad.parquet: row 1", "image 0 (encoded bytes) cannot be read"]),
    "no known layout": (_saved_without_messages, ["saved/data-00000-of-00001.arrow: columns",
                                                  "fields (prompt, answer) of no known layout",
                                                  "set mixture.sources[1].format and mixture.sources[1].columns"]),
    "missing image": (_llava_missing_image, ["llava.json: row 1 (line 1): image not found", "im/1.png"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_are_named_by_file_row_and_column(capsys, tmp_path, tiny_checkpoint, tiny_vlm_checkpoint, case):
    make, needles = BAD[case]
    path, extra = make(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", [chat(q, a) for q, a in _pairs(4)])
    model = tiny_vlm_checkpoint if case in ("undecodable image", "missing image") else tiny_checkpoint
    cfg = {"name": "bad", "model": {"path": str(model)},
           "mixture": {"sources": [{"name": "good", "train": str(good)}, {"name": "odd", "train": str(path), **extra}]},
           "split": {"r": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    capsys.readouterr()  # the data's own writing (datasets' progress bars)
    rc, _, err = run_cli(capsys, "run", tmp_path / "run.yaml", "--out", out, "--until", "mixture")
    one_error(rc, err, *needles)
    no_stage_written(out)
    assert not out.exists()


def test_config_mistakes_name_the_key(capsys, tmp_path, tiny_checkpoint):
    good = write_jsonl(tmp_path / "good.jsonl", [chat(q, a) for q, a in _pairs(4)])
    base = [{"name": "good", "train": str(good)}]
    cases = [({"name": "b", "train": str(good), "columns": {"prompt": "x"}}, "mixture.sources[1].columns: ['prompt']"),
             ({"name": "b", "train": str(good), "eval": str(good)}, "mixture.sources[1].eval: the same data"),
             ({"name": "b", "train": str(good), "format": "parquet"}, "format is parquet but the file is not")]
    for i, (source, needle) in enumerate(cases):
        cfg = {"name": "bad", "model": {"path": str(tiny_checkpoint)}, "mixture": {"sources": base + [source]},
               "split": {"r": 1}}
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        rc, _, err = run_cli(capsys, "run", path, "--out", tmp_path / f"run{i}")
        one_error(rc, err, needle)
        assert not (tmp_path / f"run{i}").exists()


# ------------------------------------------------------------------------------------ end to end (text)


def test_a_mixture_of_formats_runs_end_to_end(tmp_path, tiny_checkpoint):
    from datasets import Dataset

    root = tmp_path / "data"
    root.mkdir()
    data = {name: [dict(chat(q, a), id=f"{name}-{i}") for i, (q, a) in enumerate(_pairs(14, name))]
            for name in ("upper_copy", "lower_copy", "upper_rev", "lower_rev")}
    write_jsonl(root / "uc.jsonl", data["upper_copy"][:12])
    write_jsonl(root / "uc-eval.jsonl", data["upper_copy"][12:])
    _parquet(root / "lc.parquet", [dict(e, task="lc") for e in data["lower_copy"]] +
             [dict(chat("noise", "noise"), task="other")] * 3)
    (root / "ur.json").write_text(json.dumps([_sharegpt(e) for e in data["upper_rev"]]))
    Dataset.from_list(data["lower_rev"]).train_test_split(test_size=2, shuffle=False).save_to_disk(str(root / "lr"))
    sources = [
        {"name": "uc", "train": str(root / "uc.jsonl"), "eval": str(root / "uc-eval.jsonl")},
        {"name": "lc", "train": str(root / "lc.parquet"), "filter": {"task": "lc"}, "max_rows": 12},
        {"name": "ur", "train": str(root / "ur.json"), "format": "sharegpt"},
        {"name": "lr", "train": str(root / "lr"), "eval": str(root / "lr"), "eval_split": "test"},
    ]
    cfg = {"name": "formats", "model": {"path": str(tiny_checkpoint)},
           "mixture": {"sources": sources, "max_length": 64},
           "grads": {"calibration_size": 8, "batch_size": 8}, "train": {"batch_size": 4, "learning_rate": 1e-3},
           "eval": {"max_per_source": 2, "batch_size": 8, "max_new_tokens": 4}, "split": {"r": 1},
           "baselines": {"random": False}, "launch": {"threads": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(out)]) == 0
    manifest = artifacts.read_manifest(out / "mixture")
    by = {e["name"]: e for e in manifest["sources"]}
    assert [by[n]["samples"] for n in ("uc", "lc", "ur", "lr")] == [12, 12, 14, 12]
    assert by["lc"]["reader"] == {"filter": {"task": ["lc"]}, "max_rows": 12} and "reader" not in by["uc"]
    assert by["lr"]["eval_samples"] == 2 and by["ur"]["eval_samples"] == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]["joint"]["per_source"]) == {"uc", "lr"}
    # the same bytes read the same way: a rerun is all cached
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(out)]) == 0


def test_merit_eval_reads_a_mixture_folder_of_formats(tmp_path, tiny_checkpoint):
    rows = [dict(chat(q, a), targets=[a]) for q, a in _pairs(3)]
    _parquet(tmp_path / "m" / "eval" / "pq.parquet", rows)
    (tmp_path / "m" / "eval" / "sg.json").write_text(json.dumps([dict(_sharegpt(dict(r, id="x")), targets=r["targets"])
                                                                  for r in rows]))
    write_jsonl(tmp_path / "m" / "eval" / "cj.jsonl", rows)
    assert main(["eval", str(tiny_checkpoint), "--mixture", str(tmp_path / "m"), "--max-new-tokens", "2",
                 "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())["result"]
    assert set(result["per_source"]) == {"pq", "sg", "cj"}
    # the same examples in three formats: the same loss
    losses = result["per_source_loss"]
    assert losses["pq"] == pytest.approx(losses["cj"]) and losses["sg"] == pytest.approx(losses["cj"])
