import gzip
import json
import sys

import pytest

from dyndepth.data.sources import (
    DataError,
    Document,
    as_documents,
    iter_documents,
    iter_hf_dataset,
    list_files,
    render_chat,
)


def write_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_text_file_splits(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one line\ntwo line\n\nthird para\n", encoding="utf-8")
    assert list(iter_documents(path)) == [Document("one line\ntwo line\n\nthird para\n")]
    assert [d.text for d in iter_documents(path, text_split="line")] == ["one line", "two line", "third para"]
    assert [d.text for d in iter_documents(path, text_split="paragraph")] == [
        "one line\ntwo line",
        "third para",
    ]
    with pytest.raises(DataError, match="text_split"):
        list(iter_documents(path, text_split="word"))


def test_gzip_text_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped text é")
    write_jsonl(tmp_path / "c.jsonl.gz", [{"text": "zipped record"}], compress=True)
    assert [d.text for d in iter_documents(tmp_path / "b.txt.gz")] == ["zipped text é"]
    assert [d.text for d in iter_documents(tmp_path / "c.jsonl.gz")] == ["zipped record"]


def test_folder_is_recursive_sorted_and_globbed(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "deeper" / "c.py").write_text("C")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    write_jsonl(tmp_path / "sub" / "d.jsonl", [{"text": "D1"}, {"text": "D2"}])
    assert [d.text for d in iter_documents(tmp_path)] == ["A", "B", "D1", "D2", "C"]
    assert [d.text for d in iter_documents(tmp_path, glob="*.py")] == ["C"]
    assert [p.name for p in list_files(tmp_path, ["*.md", "*.txt"])] == ["a.txt", "b.md"]
    with pytest.raises(DataError, match="no files matching"):
        list(iter_documents(tmp_path, glob="*.rs"))


def test_folder_reads_upper_case_extensions(tmp_path):
    # a folder source skipped NOTES.TXT and DATA.JSONL silently (the globs were case-sensitive), though the same
    # file given alone was read by its extension in either case; a .GZ one was refused as "unknown file type"
    (tmp_path / "NOTES.TXT").write_text("upper")
    write_jsonl(tmp_path / "DATA.JSONL", [{"text": "record"}])
    with gzip.open(tmp_path / "c.txt.GZ", "wt", encoding="utf-8") as f:
        f.write("zipped")
    (tmp_path / "z.txt").write_text("lower")
    assert [d.text for d in iter_documents(tmp_path)] == ["record", "upper", "zipped", "lower"]
    assert [d.text for d in iter_documents(tmp_path / "c.txt.GZ")] == ["zipped"]


def test_folder_leaves_out_hidden_files_and_folders(tmp_path):
    # Jupyter's .ipynb_checkpoints/ copy of notes.txt was read too: every document twice, a held-out one in training
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("notes")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "notes.txt").write_text("notes")
    assert [d.text for d in iter_documents(tmp_path)] == ["notes"]
    assert [d.text for d in iter_documents(tmp_path / ".hidden.txt")] == ["hidden"]  # named alone: read


def test_jsonl_text_and_custom_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi", "id": 1}, {"text": "there"}])
    assert [d.text for d in iter_documents(path)] == ["hi", "there"]
    assert all(d.prompt is None for d in iter_documents(path))
    path2 = write_jsonl(tmp_path / "e.jsonl", [{"content": "x"}])
    assert [d.text for d in iter_documents(path2, text_field="content")] == ["x"]


def test_jsonl_sft_prompt_response_and_messages(tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "Q: hi", "response": "A: hello"}, {"messages": messages}]
    )
    docs = list(iter_documents(path))
    assert docs[0] == Document(text="A: hello", prompt="Q: hi")
    assert docs[0].segments() == [("Q: hi", False), ("A: hello", True)]
    assert docs[1].text == "4"
    assert docs[1].prompt == "system: be brief\nuser: 2+2?\nassistant: "
    custom = list(iter_documents(path, chat_template=lambda ms: ("P", ms[-1]["content"] + "!")))
    assert custom[1] == Document(text="4!", prompt="P")


def test_chat_without_assistant_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1.*assistant"):
        list(iter_documents(path))
    with pytest.raises(DataError, match="assistant"):
        render_chat([{"role": "user", "content": "hi"}])
    path2 = write_jsonl(tmp_path / "bad2.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="role.*content"):
        list(iter_documents(path2))
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]
    path3 = write_jsonl(tmp_path / "parts.jsonl", [{"messages": parts}])  # trained on the list's repr before
    with pytest.raises(DataError, match=r"parts\.jsonl:1.*each content a string"):
        list(iter_documents(path3))


def test_parquet_text_and_sft(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(
        pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, 3]}), tmp_path / "t.parquet", row_group_size=2
    )
    assert [d.text for d in iter_documents(tmp_path / "t.parquet")] == ["p1", "p2", "p3"]
    pq.write_table(pa.table({"prompt": ["q"], "response": ["r"]}), tmp_path / "s.parquet")
    assert list(iter_documents(tmp_path / "s.parquet")) == [Document(text="r", prompt="q")]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet.*'text'.*body"):
        list(iter_documents(tmp_path / "bad.parquet"))


def test_missing_field_names_file_line_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: record has no 'text' field.*text_field"):
        list(iter_documents(path))


def test_missing_file_unknown_extension_and_bad_json(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        list(iter_documents(tmp_path / "nope.jsonl"))
    (tmp_path / "data.xyz").write_text("?")
    with pytest.raises(DataError, match=r"data\.xyz: unknown file type.*fmt="):
        list(iter_documents(tmp_path / "data.xyz"))
    assert [d.text for d in iter_documents(tmp_path / "data.xyz", fmt="text")] == ["?"]
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        list(iter_documents(tmp_path / "broken.jsonl"))


def test_list_of_sources_and_in_memory_items(tmp_path):
    (tmp_path / "a.txt").write_text("A")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "B"}])
    assert [d.text for d in iter_documents([tmp_path / "a.txt", str(tmp_path / "b.jsonl")])] == ["A", "B"]
    docs = list(as_documents(["plain", ("p", "r"), Document("d")]))
    assert docs == [Document("plain"), Document("r", prompt="p"), Document("d")]
    with pytest.raises(DataError, match="cannot use int"):
        list(as_documents([3]))


def test_hf_datasets_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        list(iter_documents("hf:some/dataset"))


def test_hf_datasets_local_json(tmp_path):
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "h1"}, {"prompt": "p", "response": "r"}])
    docs = list(iter_hf_dataset("json", data_files=str(path)))
    assert docs == [Document("h1"), Document("r", prompt="p")]


def test_an_hf_dataset_that_cannot_load_is_one_error_naming_the_fix(tmp_path, monkeypatch):
    """Offline, `hf:<name>` ended in a page of datasets' traceback; an empty one still reads as no documents."""
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load the Hugging Face dataset 'roneneldan/TinyStories' \(split "
                                        r"'train'\): ConnectionError: Couldn't reach.*local files"):
        list(iter_documents("hf:roneneldan/TinyStories"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: [])
    assert list(iter_hf_dataset("empty")) == []


def test_an_hf_source_names_its_split_after_a_colon_and_a_shared_split_is_warned(tmp_path, caplog):
    """Every `hf:` source read split "train": a val_source of the same dataset trained on its own validation text,
    without the overlap warning a local path gets."""
    import logging

    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "TRAIN 0"}, {"text": "TRAIN 1"}])
    write_jsonl(folder / "validation.jsonl", [{"text": "VAL 0"}])
    assert datasets is not None
    assert list(iter_documents(f"hf:{folder}:validation")) == [Document("VAL 0")]
    assert list(iter_documents(f"hf:{folder}")) == [Document("TRAIN 0"), Document("TRAIN 1")]
    from dyndepth.data.build import resolve_data_config

    with caplog.at_level(logging.WARNING, logger="dyndepth"):
        resolve_data_config({"source": f"hf:{folder}", "val_source": f"hf:{folder}:validation"})
        assert "overlaps" not in caplog.text
        resolve_data_config({"source": f"hf:{folder}", "val_source": f"hf:{folder}:train"})
    assert "overlaps" in caplog.text and "the same dataset split" in caplog.text


def test_records_whose_text_is_not_a_string_are_refused_by_place(tmp_path):
    """A list, number or object was trained on as its Python repr."""
    for record, key in (({"text": ["hello", "world"]}, "text"), ({"text": 42}, "text"),
                        ({"prompt": "p", "response": {"k": 1}}, "response")):
        path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
        with pytest.raises(DataError, match=rf"d.jsonl:2: field '{key}' holds a \w+, not text"):
            list(iter_documents(path))


def test_a_byte_order_mark_and_an_eot_line_with_trailing_spaces_are_read_as_intended(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello\nworld\n".encode())
    assert [d.text for d in iter_documents(bom, text_split="line")] == ["hello", "world"]  # (was "\ufeffhello")
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(("\ufeff" + json.dumps({"text": "a"}) + "\n").encode())
    assert [d.text for d in iter_documents(jsonl)] == ["a"]  # (was refused: not JSON)
    eot = tmp_path / "eot.txt"
    eot.write_text("A\n<|endoftext|> \nB\n<|endoftext|>\r\nC\n")
    assert [d.text for d in iter_documents(eot, text_split="eot")] == ["A\n", "B\n", "C\n"]


def test_an_eot_separated_corpus_read_as_one_file_says_how_to_split_it(tmp_path, caplog):
    # the offline Gutenberg shards read with the default text_split='file' were one document: intra_doc_mask never
    # separated the books, and nothing said so
    eot = tmp_path / "eot.txt"
    eot.write_text("A\n<|endoftext|>\nB\n")
    with caplog.at_level("WARNING", logger="dyndepth.data.sources"):
        assert [d.text for d in iter_documents(eot)] == ["A\n<|endoftext|>\nB\n"]
    assert "text_split='eot'" in caplog.text
    caplog.clear()
    plain = tmp_path / "plain.txt"
    plain.write_text("a line naming <|endoftext|> inside\n")  # not a separator line: no warning
    with caplog.at_level("WARNING", logger="dyndepth.data.sources"):
        list(iter_documents(plain))
    assert "text_split" not in caplog.text


def test_a_chat_template_that_cannot_render_a_record_names_the_record(tmp_path):
    """A template reading messages[0]['role'] (Qwen2.5's) of a chat the assistant opens: its prompt is empty; the
    jinja error escaped without the record's place."""
    pytest.importorskip("jinja2")
    from dyndepth.data.chat import TemplateChat

    strict = TemplateChat("{{ messages[0]['role'] }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: the chat template could not render these messages: "
                                        r"UndefinedError"):
        list(iter_documents(path, chat_template=strict))


def test_parquet_files_that_cannot_be_read_are_one_error_naming_them(tmp_path):
    pytest.importorskip("pyarrow")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        list(iter_documents(bad))
    zipped = tmp_path / "t.parquet.gz"
    zipped.write_bytes(gzip.compress(b"whatever"))
    with pytest.raises(DataError, match="a gzipped Parquet file"):
        list(iter_documents(zipped))


def test_a_null_text_is_named_as_null_not_as_a_missing_field(tmp_path):
    """A Parquet row (or JSON line) whose text is null was reported as "record has no 'text' field (fields: [])" with
    the fix "set data.text_field": the field is there, empty; the message now says so, and how to fix the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: row 1: field 'text' is null; .*empty string"):
        list(iter_documents(tmp_path / "x.parquet"))
    (tmp_path / "y.jsonl").write_text('{"text": "a"}\n{"text": null, "id": 3}\n')
    with pytest.raises(DataError, match=r"y.jsonl:2: field 'text' is null"):
        list(iter_documents(tmp_path / "y.jsonl"))


def test_an_hf_source_names_the_datasets_configuration_before_its_split(monkeypatch):
    """`hf:` named a dataset and a split only: one with several configurations (wikitext's "wikitext-2-raw-v1",
    glue's tasks) could not be read at all; "hf:wikitext:wikitext-2-raw-v1" read the configuration as a split."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs["split"]))
        return [{"text": f"{path}/{name}/{kwargs['split']}"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for source, want in [("hf:wikitext:wikitext-2-raw-v1:validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
                         ("hf:wikitext:wikitext-2-raw-v1:", ("wikitext", "wikitext-2-raw-v1", "train")),
                         ("hf:org/set:test", ("org/set", None, "test")),
                         ("hf:org/set", ("org/set", None, "train")),
                         ("hf:org/set:train[:1000]", ("org/set", None, "train")),  # (a slice's colon; its rows
                         ("hf:glue:cola:train[0:20]", ("glue", "cola", "train"))]:  # are taken as they stream)
        calls.clear()
        assert list(iter_documents(source)) == [Document("/".join(map(str, want)))]
        assert calls == [want], source
    from dyndepth.data.build import resolve_data_config

    for bad in ("hf:a:b:c:d", "hf::train"):  # refused as the config is read, before any work
        with pytest.raises(DataError, match=r"write 'hf:<name>', 'hf:<name>:<split>' or 'hf:<name>:<config>:<split>'"):
            resolve_data_config({"source": bad})


def test_an_hf_sources_split_slice_takes_those_rows_of_the_stream(tmp_path):
    """A split slice ("train[:1000]") reached datasets' streaming load, which takes none ("Bad split: train[:1000]"):
    a documented source could not be read. The rows are taken from the stream instead."""
    pytest.importorskip("datasets")

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(5)))
    for split, want in (("train[1:3]", ["row 1", "row 2"]), ("train[:2]", ["row 0", "row 1"]),
                        ("train[3:]", ["row 3", "row 4"]), ("train", [f"row {i}" for i in range(5)])):
        assert [d.text for d in iter_hf_dataset("json", split, data_files=str(data))] == want, split
    with pytest.raises(DataError, match=r"a streamed split takes a slice of row numbers only"):
        list(iter_hf_dataset("json", "train[:50%]", data_files=str(data)))
