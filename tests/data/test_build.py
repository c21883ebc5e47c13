import json

import pytest

from dyndepth.data import build
from dyndepth.data.build import build_loader, resolve_data_config, split_text, user_shards
from dyndepth.data.sources import DataError, Document
from dyndepth.tokenizer import ByteTokenizer, train_bpe


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(tmp_path, source, **kw):
    return resolve_data_config({"source": str(source), "cache_dir": str(tmp_path / "cache"), **kw})


def test_cache_key_follows_the_content_and_the_tokenizer(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("the first version of the corpus\n")
    first = user_shards(_cfg(tmp_path, src), ByteTokenizer(), "train")
    src.write_text("an edited corpus, same path\n")  # same path, class and vocab size: a new cache entry
    edited = user_shards(_cfg(tmp_path, src), ByteTokenizer(), "train")
    train_part = split_text(Document("an edited corpus, same path\n"), "train").text  # (its tail held out)
    assert edited.num_tokens == len(train_part) + 1 != first.num_tokens
    digests = json.loads((tmp_path / "cache" / "source_digests.json").read_text())
    assert len(digests) == 2  # one per version: an unchanged file is not read again at the next start
    texts = ["hello world, hello there"] * 20
    bpe_a = train_bpe(iter(texts), vocab_size=270)
    bpe_b = train_bpe(iter(["other words entirely"] * 20), vocab_size=270)
    assert type(bpe_a) is type(bpe_b) and bpe_a.vocab_size == bpe_b.vocab_size
    a, b = (build._shard_dir(_cfg(tmp_path, src), t, str(src), True) for t in (bpe_a, bpe_b))
    assert a != b
    assert build._shard_dir(_cfg(tmp_path, src, chat_template="plain"), bpe_a, str(src), True) == a
    assert build._shard_dir(_cfg(tmp_path, src, text_field="body"), bpe_a, str(src), True) != a


def test_rank_1_waits_for_rank_0_and_builds_nothing(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i}"} for i in range(5)])
    cfg, calls = _cfg(tmp_path, src), []

    def barrier():  # rank 0 finishes its build while rank 1 waits here
        calls.append(list((tmp_path / "cache").rglob("*.bin")) if (tmp_path / "cache").exists() else [])
        user_shards(cfg, ByteTokenizer(), "train", rank=0)

    shards = user_shards(cfg, ByteTokenizer(), "train", rank=1, barrier=barrier)
    assert calls == [[]]  # nothing was written by rank 1 before the barrier
    assert shards.num_documents == 4  # document 0 is held out for validation
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]


def test_documents_stream_into_the_shards(tmp_path, monkeypatch):
    """The builder tokenizes while documents are still being read (never a whole-corpus list)."""
    pulled, encoded = [0], [0]

    class CountingBytes(ByteTokenizer):
        def encode(self, text, add_bos=False):
            encoded[0] += 1
            return super().encode(text, add_bos)

    lag = []

    def documents(source, **kw):
        for i in range(3000):
            lag.append(pulled[0] - encoded[0])
            pulled[0] += 1
            yield Document(f"doc {i}")

    monkeypatch.setattr(build, "iter_documents", documents)
    monkeypatch.setattr(build, "source_fingerprint", lambda source, cache_dir=None: "fixed")
    shards = user_shards(_cfg(tmp_path, "anything"), CountingBytes(), "train")
    assert shards.num_documents == 3000 - 30  # every 100th document is validation
    assert max(lag) <= 1024 + 20  # one tokenizer batch (1024 documents) plus the held-out ones in it


def test_empty_documents_are_not_held_out(tmp_path):
    # a folder of code whose first file is an empty __init__.py: that file was the whole validation split, whose
    # build then failed with "every document of the source was empty"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for i in range(3):
        (tmp_path / "pkg" / f"mod{i}.py").write_text(f"def f{i}(): pass\n")
    cfg = _cfg(tmp_path, tmp_path / "pkg")
    train, val = (user_shards(cfg, ByteTokenizer(), split) for split in ("train", "val"))
    assert val.num_tokens == len("def f0(): pass\n") + 1  # the first non-empty file
    assert train.num_documents == 2 and train.num_tokens == 2 * val.num_tokens


def test_text_field_and_chat_template_keys(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"body": "some text here"}] * 3)
    with pytest.raises(DataError, match="text_field"):
        user_shards(_cfg(tmp_path, src), ByteTokenizer(), "train")
    shards = user_shards(_cfg(tmp_path, src, text_field="body"), ByteTokenizer(), "train")
    assert shards.num_tokens == 2 * (len("some text here") + 1)
    with pytest.raises(DataError, match="chat_template='tokenizer' but the tokenizer has no chat template"):
        user_shards(_cfg(tmp_path, src, text_field="body", chat_template="tokenizer"), ByteTokenizer(), "train")
    with pytest.raises(DataError, match="not one of"):
        user_shards(_cfg(tmp_path, src, chat_template="qwen"), ByteTokenizer(), "train")


def test_a_single_document_source_holds_out_the_tail_of_its_text(tmp_path):
    # it served its one document whole to both splits: the "held-out" loss (repro, train's eval) scored training text
    src = tmp_path / "one.txt"
    lines = [f"line {i} of the only document in this corpus" for i in range(40)]
    src.write_text("\n".join(lines))
    cfg = _cfg(tmp_path, src)
    loader_kw = {"batch_size": 1, "seq_len": 8, "seed": 0}
    train, val = (build_loader(cfg, split=s, **loader_kw) for s in ("train", "val"))
    text = {s: bytes(x.shards.tokens(0, x.shards.num_tokens - 1).tolist()).decode()  # (less the EOS)
            for s, x in (("train", train), ("val", val))}
    assert text["train"] + text["val"] == src.read_text()  # disjoint, in order, nothing lost
    assert text["val"].startswith("line ") and 0.1 <= len(text["val"]) / len(src.read_text()) <= 0.2  # at a line
    whole = build_loader(cfg, split="train", hold_out=False, **loader_kw)  # a run that does not evaluate: all of it
    assert whole.shards.num_tokens == len(src.read_text()) + 1
    small = _cfg(tmp_path, src)  # its tenth makes 2 windows of 65 tokens: too few for a batch of 4, named as such
    with pytest.raises(DataError, match=r"validation split \(every 100th document of data.source \(of a one-document "
                                        r"source, the last tenth of its text\)\) is too small: .*eval.enabled=false"):
        build_loader(small, split="val", batch_size=4, seq_len=64, seed=0)
    embedded = {"source": "embedded", "synthetic_examples": 100, "stdlib_bytes": 1000}  # its fix is not val_source
    with pytest.raises(DataError, match=r"embedded source's validation examples.*set more data.synthetic_examples"):
        build_loader(embedded, split="val", batch_size=256, seq_len=1024, seed=0)
    one = tmp_path / "short.txt"
    one.write_text("x" * 200)  # no line break: cut at the tenth
    assert len(split_text(Document(one.read_text()), "val").text) == 20
    chat = Document("the answer", prompt="the question")  # a chat record cannot be cut: both splits get it
    assert split_text(chat, "train") == split_text(chat, "val") == chat
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no documents"):
        user_shards(_cfg(tmp_path, empty), ByteTokenizer(), "train")


def test_eot_separated_text_and_a_bpe_trained_on_the_source(tmp_path):
    import gzip

    from dyndepth.data.build import build_loader, build_tokenizer
    from dyndepth.data.sources import iter_documents

    books = [f"Book {i}. " + " ".join(f"word{j % 37} and more text" for j in range(300)) for i in range(6)]
    corpus = tmp_path / "corpus.txt.gz"
    with gzip.open(corpus, "wt") as f:
        for book in books:
            f.write(book + "\n<|endoftext|>\n")
    docs = list(iter_documents(corpus, text_split="eot"))
    assert [d.text for d in docs] == [b + "\n" for b in books]
    cfg = {"source": str(corpus), "tokenizer": "bpe:320", "text_split": "eot", "cache_dir": str(tmp_path / "c")}
    tok = build_tokenizer(cfg)
    assert 257 < tok.vocab_size <= 320 and tok.decode(tok.encode(books[1])) == books[1]  # merges learned, exact
    cached = list((tmp_path / "c" / "tokenizers").iterdir())
    assert len(cached) == 1 and build_tokenizer(cfg).encode(books[2]) == tok.encode(books[2])  # loaded, not retrained
    loader = build_loader(cfg, split="train", batch_size=2, seq_len=32, seed=0, tokenizer=tok)
    assert loader.next_batch()["input_ids"].max() < 320
    with pytest.raises(DataError, match="bpe:N"):
        build_tokenizer({**cfg, "tokenizer": "bpe:many"})


def test_synthetic_answer_loss_and_task_weights():
    """synthetic_loss='answer': only answer characters, their terminator and EOS are targets; weights skew the mix."""
    data = {"source": "synthetic", "tasks": ["add", "copy"], "task_weights": [3, 1], "synthetic_examples": 400,
            "difficulty": {"add": {"digits": 2}}, "synthetic_loss": "answer"}
    docs = build.embedded_documents(resolve_data_config(data), "train", seed=0)
    assert len(docs) == 400 and all(d.prompt and d.text.endswith("\n") for d in docs)
    assert 250 < sum(not d.prompt.startswith("copy:") for d in docs) < 350  # ~3/4 additions
    batch = build_loader(data, split="train", batch_size=4, seq_len=64, seed=0, tokenizer=ByteTokenizer()).next_batch()
    targets = batch["labels"][batch["labels"] != -100]
    assert set(targets.tolist()) <= set(b"0123456789abcdefghijklmnopqrstuvwxyz\n") | {257}  # no '+', '=', 'copy:'
    with pytest.raises(DataError, match="synthetic_loss"):
        resolve_data_config({"synthetic_loss": "prompt"})


def test_a_bpe_trained_on_another_record_field_is_another_tokenizer(tmp_path):
    """The cache key left out data.text_field: a BPE trained on the records' `text` was reused for their `code`."""
    import json

    from dyndepth.data.build import build_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"plain words {i} here", "code": f"def argument_{i}(x): return x"})
                            + "\n" for i in range(200)))
    cfg = {"source": str(data), "tokenizer": "bpe:300", "cache_dir": str(tmp_path / "c")}
    build_tokenizer(cfg)
    build_tokenizer({**cfg, "text_field": "code"})
    assert len(list((tmp_path / "c" / "tokenizers").iterdir())) == 2


def test_a_bpe_of_a_source_with_and_without_held_out_documents_are_two_tokenizers(tmp_path):
    """Without val_source documents 0, 100, ... are held out of the BPE's text, with it they are not: the two shared a
    folder, so the first run decided what the second tokenized with."""
    from dyndepth.data.build import bpe_folder, resolve_data_config

    (tmp_path / "t.txt").write_text("some text\n")
    (tmp_path / "v.txt").write_text("held out\n")
    cfg = {"source": str(tmp_path / "t.txt"), "tokenizer": "bpe:300", "cache_dir": str(tmp_path / "c")}
    held, whole = (bpe_folder(resolve_data_config(c))[0] for c in (cfg, {**cfg, "val_source": str(tmp_path / "v.txt")}))
    assert held != whole and held.parent == whole.parent


def test_a_list_of_sources_trains_on_each_in_order_and_keys_its_cache_by_all_of_them(tmp_path, caplog):
    # data.source could name one file or folder only: a corpus of several shards beside a held-out one needed a
    # folder of copies (and a folder holding the validation file trained on it, silently)
    a, b, val = (tmp_path / n for n in ("a.txt", "b.txt", "val.txt"))
    a.write_text("alpha text\n")
    b.write_text("bravo text\n")
    val.write_text("held out\n")
    cfg = resolve_data_config({"source": [str(a), b], "val_source": str(val), "cache_dir": str(tmp_path / "c")})
    assert cfg["source"] == [str(a), str(b)]
    train = user_shards(cfg, ByteTokenizer(), "train")
    ids = train.tokens(0, train.num_tokens)
    text = bytes(int(i) for i in ids if i < 256).decode()
    assert text == "alpha text\nbravo text\n" and train.num_documents == 2
    assert bytes(int(i) for i in user_shards(cfg, ByteTokenizer(), "val").tokens(0, 9) if i < 256) == b"held out\n"
    keys = {build._shard_dir(resolve_data_config({**cfg, "source": s}), ByteTokenizer(), s, False)
            for s in ([str(a), str(b)], [str(b), str(a)], str(a))}
    assert len(keys) == 3  # the order and every item are in the cache key
    assert resolve_data_config({"source": [str(a)]})["source"] == str(a)  # one item: that source, its cache
    b.write_text("bravo edited\n")
    assert build._shard_dir(cfg, ByteTokenizer(), cfg["source"], False) not in keys
    with caplog.at_level("WARNING"):  # a validation file inside the training source is trained on: said
        resolve_data_config({"source": str(tmp_path), "val_source": str(val)})
    assert "overlaps data.source" in caplog.text and "also trained on" in caplog.text


@pytest.mark.parametrize("source, match", [([], "at least one"), (["a.txt", 3], "at least one"),
                                           (["embedded", "a.txt"], "cannot be listed"), (7, "is not a source")])
def test_bad_source_lists_are_named(source, match):
    with pytest.raises(DataError, match=match):
        resolve_data_config({"source": source})


def test_val_source_with_the_embedded_data_is_an_error():
    # it was ignored: the embedded data hold out their own examples
    with pytest.raises(DataError, match="remove data.val_source"):
        resolve_data_config({"source": "embedded", "val_source": "x.txt"})


def test_no_val_source_may_be_written_none_or_an_empty_list_and_one_item_lists_key_as_their_item(tmp_path):
    from dyndepth.bench.study import data_key
    from dyndepth.runconfig import load_run_config
    from dyndepth.train.run import absolute_paths

    a = tmp_path / "a.txt"
    a.write_text("text\n")
    for none in (None, [], ""):  # (--set data.val_source=none parses to None: it was an error for a moment)
        assert resolve_data_config({"source": str(a), "val_source": none})["val_source"] == ""
    assert data_key({"source": [str(a)]}) == data_key({"source": str(a)})
    mixed = data_key({"source": [str(a), "hf:org/set"]})["source"]
    a.write_text("edited\n")  # a list holding hf: names still follows its local files' content
    assert data_key({"source": [str(a), "hf:org/set"]})["source"] != mixed
    one = absolute_paths(load_run_config(None, [f'data.source=["{a}"]']))
    assert one.data["source"] == str(a)  # (resuming a run saved with the item compares equal)


def test_interleave_keeps_every_document():
    # float steps dropped the shorter list's last item: 186 synthetic documents (data.synthetic_examples=5950) and
    # 89 stdlib files gave 274 documents, the last stdlib file lost
    for n in range(1, 120):
        for m in range(1, n + 1):
            a, b = list(range(n)), [-j - 1 for j in range(m)]
            out = build._interleave(a, b)
            assert [x for x in out if x >= 0] == a and [x for x in out if x < 0] == b, (n, m)
    assert len(build._interleave(list(range(186)), [-j - 1 for j in range(89)])) == 275


def test_a_mistyped_text_split_is_refused_when_the_config_is_read(tmp_path):
    # a jsonl-only source never reads text_split, so "paragraphs" was accepted (and keyed another shard cache); a text
    # source failed later with an error that did not name data.text_split
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=r"data.text_split='paragraphs' is not one of \('file', 'line'"):
        resolve_data_config({"source": str(records), "text_split": "paragraphs"})
    assert resolve_data_config({"source": str(records), "text_split": "paragraph"})["text_split"] == "paragraph"


def test_two_processes_training_one_bpe_without_a_barrier_both_end_with_the_winners_folder(tmp_path, monkeypatch):
    """Two jobs sharing one data cache (not one torchrun job: no barrier) both find no BPE and train one. The folder
    that appears between the loser's check and its rename made `os.replace` of a folder onto a non-empty folder
    raise OSError (ENOTEMPTY); the loser now drops its copy and loads the winner's."""
    import os
    import shutil

    from dyndepth.data.build import bpe_folder, build_tokenizer

    (tmp_path / "t.txt").write_text("some words and some more words\n" * 50)
    cfg = {"source": str(tmp_path / "t.txt"), "tokenizer": "bpe:280", "cache_dir": str(tmp_path / "c")}
    folder = bpe_folder(resolve_data_config(cfg))[0]
    replace = os.replace

    def winner_first(src, dst):  # the other job renames its finished folder just before ours
        if os.path.isdir(src) and str(dst) == str(folder) and not os.path.exists(dst):
            shutil.copytree(src, dst)
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", winner_first)
    tok = build_tokenizer(cfg)
    monkeypatch.setattr(os, "replace", replace)
    assert (folder / "tokenizer.json").is_file() and os.listdir(folder.parent) == [folder.name]  # no tmp left
    assert tok.decode(tok.encode("some words")) == "some words"
    (folder / "tokenizer.json").unlink()  # a folder left without its tokenizer is named, with the fix
    (folder / "stray").write_text("")
    with pytest.raises(DataError, match="no tokenizer.json.*delete it"):
        build_tokenizer(cfg)


def test_plain_text_caches_are_rekeyed_since_a_text_ending_in_eos_gets_no_second_one(tmp_path):
    """Since a document that already ends in the EOS stopped getting a second one, plain text ending in the EOS's text
    (GPT-2 style "...<|endoftext|>") tokenizes to one EOS less; only chat-template keys were renewed, so a plain-text
    cache built before was served as it was (two EOS), beside splits built since with one. A tokenizer whose EOS no
    text encodes to (the byte tokenizer's) keeps its key: its caches did not change."""
    import hashlib

    from dyndepth.data.build import HOLDOUT_SCHEME, source_fingerprint, tokenizer_fingerprint
    from dyndepth.data.shards import FORMAT_VERSION, encode_document

    src = tmp_path / "t.txt"
    src.write_text("hello there<|endoftext|>")
    cfg = _cfg(tmp_path, src)
    bpe = train_bpe(iter(["hello there"] * 20), vocab_size=270)
    assert list(encode_document(Document(src.read_text()), bpe)[0]).count(bpe.eos_token_id) == 1

    def before(tok):  # the key the plain rendering had
        key = [FORMAT_VERSION, source_fingerprint(str(src), cfg["cache_dir"]), tokenizer_fingerprint(tok), "plain",
               "text", HOLDOUT_SCHEME]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    assert build._shard_dir(cfg, bpe, str(src), True).name != before(bpe)
    assert build._shard_dir(cfg, ByteTokenizer(), str(src), True).name == before(ByteTokenizer())


def test_build_loader_without_a_tokenizer_builds_the_one_data_tokenizer_names(tmp_path):
    """build_loader's own tokenizer was `load_tokenizer(data.tokenizer)`, which reads "bpe:N" as a folder path: a
    cache built beforehand in one process (as the module says to, before a long torchrun job) failed with "tokenizer
    path 'bpe:280' does not exist". It now trains (or loads) the cached BPE as a run does."""
    from dyndepth.data.build import build_tokenizer

    (tmp_path / "t.txt").write_text("some words and more words here\n" * 300)
    cfg = {"source": str(tmp_path / "t.txt"), "tokenizer": "bpe:280", "cache_dir": str(tmp_path / "c")}
    loader = build_loader(cfg, batch_size=2, seq_len=16, seed=0)
    tok = build_tokenizer(cfg)  # the cached one, loaded
    assert tok.vocab_size > 257 and loader.shards.vocab_size == tok.vocab_size
    assert build_loader(cfg, batch_size=2, seq_len=16, seed=0, tokenizer=tok).shards.manifest == loader.shards.manifest


@pytest.mark.parametrize("key, value, match", [
    ("synthetic_examples", "abc", r"data.synthetic_examples='abc' must be a whole number >= 0"),
    ("synthetic_examples", 2.5, r"data.synthetic_examples=2.5 must be a whole number >= 0"),
    ("synthetic_examples", -5, r"data.synthetic_examples=-5 must be a whole number >= 0"),
    ("stdlib_bytes", True, r"data.stdlib_bytes=True must be a whole number"),
    ("examples_per_doc", 0, r"data.examples_per_doc=0 must be a whole number >= 1"),
    ("intra_doc_mask", "x", r"data.intra_doc_mask='x' must be true or false"),
    ("tasks", 3, r"data.tasks=3 must be a list of task names \(on the command line --set data.tasks=add,mul\)"),
    ("task_weights", "x", r"data.task_weights='x' must be a list of numbers, one per task"),
    ("difficulty", "x", r"data.difficulty='x' must be a table of task -> knobs"),
    ("text_field", 3, r"data.text_field=3 must be the name of a record field"),
])
def test_a_mistyped_data_value_is_named_when_the_config_is_read(key, value, match):
    # the [data] section is a dict, so nothing checked its types: synthetic_examples="abc" or 2.5 stopped in the
    # generator with a TypeError, -5 with "n must be >= 0", and intra_doc_mask="x" turned the mask on
    with pytest.raises(DataError, match=match):
        resolve_data_config({key: value})


def test_data_lists_from_the_command_line_read_as_the_recipe_writes_them():
    # `--set data.tasks=add,mul` (a string) was read letter by letter: "unknown synthetic task 'a'"
    from dyndepth.runconfig import load_run_config

    data = load_run_config(None, ["data.tasks=add,mul", "data.task_weights=1,3", "data.stdlib_bytes=1e5"]).data
    cfg = resolve_data_config(data)
    assert (cfg["tasks"], cfg["task_weights"], cfg["stdlib_bytes"]) == (["add", "mul"], [1.0, 3.0], 100_000)
    assert build.task_mix(data).tasks == ("add", "mul")
    assert resolve_data_config({"tasks": "var"})["tasks"] == ["var"]
    empty = resolve_data_config({"tasks": None, "task_weights": None, "difficulty": None})  # empty YAML keys
    assert (empty["tasks"], empty["task_weights"], empty["difficulty"]) == ([], [], {})


def test_whole_number_data_settings_written_as_floats_are_read_as_ints():
    cfg = resolve_data_config({"stdlib_bytes": 2e6, "synthetic_examples": 100.0})
    assert cfg["stdlib_bytes"] == 2_000_000 and type(cfg["stdlib_bytes"]) is int
    assert type(cfg["synthetic_examples"]) is int
