import json

import numpy as np
import pytest

from dyndepth.data.shards import ShardSet, build_shards, encode_document, open_shards, token_dtype
from dyndepth.data.sources import DataError, Document


class ByteTokenizer:
    """UTF-8 bytes as ids; EOS is the id after the bytes. `vocab_size` is settable to force uint32."""

    def __init__(self, vocab_size: int = 257, eos_token_id: int | None = 256) -> None:
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.name_or_path = "fake-bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def expected_stream(docs, tok, append_eos=True):
    ids = []
    for d in docs:
        piece = tok.encode(d) if isinstance(d, str) else tok.encode(d[0]) + tok.encode(d[1])
        ids += piece + ([tok.eos_token_id] if append_eos and piece else [])
    return np.array(ids, dtype=np.int64)


DOCS = [f"document number {i} " + "x" * (i * 7 % 23) for i in range(12)]


def test_round_trip_across_shard_boundaries(tmp_path):
    tok = ByteTokenizer()
    shards = build_shards(DOCS, tok, tmp_path, shard_tokens=50, source="unit test")
    ref = expected_stream(DOCS, tok)
    assert shards.num_tokens == len(ref) == len(shards)
    assert len(shards.manifest["shards"]) == -(-len(ref) // 50)
    np.testing.assert_array_equal(shards.tokens(0, len(ref)), ref)
    for start, end in [(45, 55), (0, 50), (49, 151), (len(ref) - 3, len(ref)), (7, 7)]:
        np.testing.assert_array_equal(shards.tokens(start, end), ref[start:end])
    reopened = open_shards(tmp_path)  # parent folder + default split
    np.testing.assert_array_equal(reopened.tokens(40, 120), ref[40:120])
    with pytest.raises(IndexError):
        shards.tokens(0, len(ref) + 1)


def test_files_dtype_and_manifest(tmp_path):
    small = build_shards(DOCS, ByteTokenizer(257), tmp_path / "small", shard_tokens=64, split="val")
    big = build_shards(DOCS, ByteTokenizer(100_000), tmp_path / "big", shard_tokens=64)
    split_dir = tmp_path / "small" / "val"
    manifest = json.loads((split_dir / "manifest.json").read_text())
    assert manifest == small.manifest
    assert manifest["dtype"] == "uint16" and big.manifest["dtype"] == "uint32"
    assert manifest["vocab_size"] == 257 and manifest["split"] == "val" and manifest["version"] == 1
    assert manifest["num_tokens"] == sum(s["num_tokens"] for s in manifest["shards"]) == small.num_tokens
    assert manifest["num_documents"] == len(DOCS) and manifest["has_loss_mask"] is False
    assert manifest["tokenizer"]["name"] == "fake-bytes" and manifest["tokenizer"]["eos_token_id"] == 256
    first = manifest["shards"][0]
    assert first["file"] == "shard_00000.bin" and first["mask_file"] is None
    assert (split_dir / "shard_00000.bin").stat().st_size == 64 * 2
    assert (tmp_path / "big" / "train" / "shard_00000.bin").stat().st_size == 64 * 4
    assert not list(split_dir.glob("*.tmp"))
    np.testing.assert_array_equal(small.tokens(0, small.num_tokens), big.tokens(0, big.num_tokens))
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_doc_starts_and_range_query(tmp_path):
    tok = ByteTokenizer()
    shards = build_shards(DOCS, tok, tmp_path, shard_tokens=37)
    lengths = [len(tok.encode(d)) + 1 for d in DOCS]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.testing.assert_array_equal(shards.doc_starts(), starts)
    np.testing.assert_array_equal(shards.doc_starts(30, 100), starts[(starts >= 30) & (starts < 100)])
    assert shards.num_documents == len(DOCS)


def test_sft_loss_mask_only_where_prompts_are(tmp_path):
    tok = ByteTokenizer()
    docs = ["plain pretraining text " * 3, ("PROMPT", "answer"), "tail"]
    shards = build_shards(docs, tok, tmp_path, shard_tokens=40)
    entries = shards.manifest["shards"]
    assert shards.has_loss_mask and shards.manifest["has_loss_mask"]
    assert entries[0]["mask_file"] is None  # the first 40 tokens are plain text
    assert any(e["mask_file"] for e in entries)
    mask = shards.loss_mask(0, shards.num_tokens)
    ref_ids = expected_stream(docs, tok)
    np.testing.assert_array_equal(shards.tokens(0, shards.num_tokens), ref_ids)
    p0 = len(tok.encode(docs[0])) + 1
    expected = np.ones(len(ref_ids), np.uint8)
    expected[p0 : p0 + len("PROMPT")] = 0  # prompt tokens untrained; answer and its EOS trained
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(open_shards(tmp_path / "train").loss_mask(0, shards.num_tokens), expected)


def test_encode_document_and_eos_options(tmp_path):
    tok = ByteTokenizer()
    ids, mask = encode_document(Document("ab", prompt="c"), tok)
    assert ids.tolist() == [99, 97, 98, 256] and mask.tolist() == [0, 1, 1, 1]
    ids, mask = encode_document(Document("ab"), tok, append_eos=False)
    assert ids.tolist() == [97, 98] and mask is None
    shards = build_shards(["ab", "", "cd"], tok, tmp_path, append_eos=False)
    assert shards.tokens(0, 4).tolist() == [97, 98, 99, 100] and shards.num_documents == 2
    with pytest.raises(DataError, match="eos_token_id"):
        build_shards(["ab"], ByteTokenizer(eos_token_id=None), tmp_path / "x")
    with pytest.raises(DataError, match="vocab_size"):
        build_shards(["é"], ByteTokenizer(vocab_size=128, eos_token_id=127), tmp_path / "y")
    with pytest.raises(DataError, match="empty"):
        build_shards([""], tok, tmp_path / "z")


def test_rebuild_replaces_split_and_removes_stale_shards(tmp_path):
    tok = ByteTokenizer()
    build_shards(DOCS, tok, tmp_path, shard_tokens=20)
    assert (tmp_path / "train" / "shard_00005.bin").exists()
    shards = build_shards(["short"], tok, tmp_path, shard_tokens=20)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "manifest.json",
        "shard_00000.bin",
        "shard_00000.idx",
    ]
    assert shards.tokens(0, 6).tolist() == tok.encode("short") + [256]


def test_missing_manifest_and_truncated_shard_errors(tmp_path):
    with pytest.raises(DataError, match="no shard manifest"):
        open_shards(tmp_path)
    build_shards(DOCS, ByteTokenizer(), tmp_path, shard_tokens=50)
    shard = tmp_path / "train" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard_00001\.bin.*rebuild"):
        open_shards(tmp_path / "train")


def test_worker_pool_matches_serial(tmp_path):
    tok = ByteTokenizer()
    docs = DOCS + [("prompt", "resp")]
    serial = build_shards(docs, tok, tmp_path / "a", shard_tokens=30)
    pooled = build_shards(docs, tok, tmp_path / "b", shard_tokens=30, num_workers=2)
    n = serial.num_tokens
    np.testing.assert_array_equal(serial.tokens(0, n), pooled.tokens(0, n))
    np.testing.assert_array_equal(serial.loss_mask(0, n), pooled.loss_mask(0, n))
    np.testing.assert_array_equal(serial.doc_starts(), pooled.doc_starts())


def test_in_memory_shardset_matches_disk(tmp_path):
    tok = ByteTokenizer()
    docs = DOCS[:4] + [("q", "a")]
    disk = build_shards(docs, tok, tmp_path, shard_tokens=16)
    mem = ShardSet.from_documents(docs, tok)
    n = disk.num_tokens
    assert mem.num_tokens == n and mem.has_loss_mask
    np.testing.assert_array_equal(mem.tokens(3, n), disk.tokens(3, n))
    np.testing.assert_array_equal(mem.loss_mask(0, n), disk.loss_mask(0, n))
    np.testing.assert_array_equal(mem.doc_starts(5, n), disk.doc_starts(5, n))


QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
TRICKY = ("It's 12345 o'clock.\n\nThe  café,   naïve\tand  odd!!  Words: a b c...\n  indented line\n"
          "x=1; y = [2, 3] # done?\r\nLast   words  ") * 40


def _bpe(kind: str):
    from tokenizers import Regex, pre_tokenizers

    from dyndepth.tokenizer import HFTokenizer, train_bpe

    tok = train_bpe(iter([TRICKY[:2000]] * 5), vocab_size=400)
    if kind == "qwen":  # Qwen2/3 and Llama 3: a Split regex, then ByteLevel without its own regex
        tok.backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok = HFTokenizer(tok.backend, eos_token="<|endoftext|>")
    if kind == "metaspace":  # SentencePiece-style: a leading "▁" per encode call, so cutting is not exact
        tok.backend.pre_tokenizer = pre_tokenizers.Metaspace()
        tok = HFTokenizer(tok.backend, eos_token="<|endoftext|>")
    return tok


@pytest.mark.parametrize("kind", ["gpt2", "qwen"])
def test_long_texts_cut_into_pieces_encode_like_the_whole(kind, monkeypatch):
    from dyndepth.data import shards as shards_mod

    tok = _bpe(kind)
    assert tok.splits_before_words
    monkeypatch.setattr(shards_mod, "PIECE_CHARS", 64)
    pieces = shards_mod.cut_text(TRICKY, tok, size=64)
    assert len(pieces) > 50 and "".join(pieces) == TRICKY
    ids, mask = encode_document(Document(TRICKY, prompt=TRICKY[:300]), tok)
    prompt = tok.encode(TRICKY[:300])  # one encode call each: the ids of the uncut texts
    whole = prompt + tok.encode(TRICKY) + [tok.eos_token_id]
    assert ids.tolist() == whole and mask.tolist() == [0] * len(prompt) + [1] * (len(whole) - len(prompt))


def test_tokenizers_that_cannot_be_cut_are_encoded_whole():
    from dyndepth.data.shards import cut_text

    tok = _bpe("metaspace")
    assert not tok.splits_before_words and cut_text(TRICKY, tok, size=64) == [TRICKY]
    assert cut_text(TRICKY, ByteTokenizer(), size=64) == [TRICKY]  # no batch API, no flag: never cut


def test_shards_are_built_with_the_batch_api(tmp_path):
    tok = _bpe("gpt2")
    calls = {"many": 0, "one": 0}
    many, one = tok.encode_many, tok.encode

    def encode_many(texts):
        calls["many"] += 1
        return many(texts)

    def encode(text, add_bos=False):
        calls["one"] += 1
        return one(text, add_bos)

    tok.encode_many, tok.encode = encode_many, encode
    docs = [f"document {i}: " + TRICKY[: 10 * i] for i in range(50)] + [("a prompt", "an answer")]
    built = build_shards(docs, tok, tmp_path)
    assert calls == {"many": 1, "one": 0}  # one batch-API call for all 51 documents
    ref = [i for d in docs[:-1] for i in one(d) + [tok.eos_token_id]]
    ref += one("a prompt") + one("an answer") + [tok.eos_token_id]
    np.testing.assert_array_equal(built.tokens(0, built.num_tokens), ref)


def test_documents_open_with_the_bos_a_llama_tokenizer_adds_to_every_text():
    """Generate and eval encode a prompt as the tokenizer does (`add_bos=None`: Llama's post-processor prepends <s>);
    the shard builder never did, so a Llama model post-trained on packed documents saw none of them open with the BOS
    every prompt it is scored or sampled on starts with. One BOS per document: a text already opening with it (a
    chat template's {{ bos_token }}) gets no second; it is part of the prompt (not trained) where there is one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from dyndepth.tokenizer import HFTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = HFTokenizer(backend, bos_token="<s>", eos_token="</s>")
    assert tok.encode("ab", add_bos=None)[0] == 0  # what generate and eval feed the model
    ids, mask = encode_document(Document("ab"), tok)
    assert ids.tolist() == [0, *tok.encode("ab"), 1] and mask is None
    ids, mask = encode_document(Document("ab", prompt="c"), tok)
    assert ids.tolist() == [0, *tok.encode("c"), *tok.encode("ab"), 1]
    assert mask.tolist() == [0] * (1 + len(tok.encode("c"))) + [1] * (len(tok.encode("ab")) + 1)
    assert encode_document(Document("<s>ab"), tok)[0].tolist() == [0, *tok.encode("ab"), 1]
    shards = ShardSet.from_documents(["ab", "cd"], tok)
    assert [shards.tokens(int(s), int(s) + 1).item() for s in shards.doc_starts()] == [0, 0]
    assert encode_document(Document("ab"), ByteTokenizer())[0].tolist() == [97, 98, 256]  # (no BOS rule: none)
