import json
import random

import pytest
import torch
from tokenizers import pre_tokenizers

from dyndepth.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    encode_batch,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

SAMPLES = [
    "hello world",
    "",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n",
    "naïve café, Grüße, 日本語のテキスト, Ελληνικά",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "unseen: ∮ E⋅da = Q,  n → ∞",
    "x" * 50,
    "spaces before punctuation , . ! ? and don 't",
]


def _corpus(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "depth", "token", "adaptive", "layer", "skip", "router", "über", "café", "日本", "🙂"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus_file) -> HFTokenizer:
    return train_bpe([corpus_file], vocab_size=300, special_tokens=("<|endoftext|>", "<|pad|>"))


# ------------------------------------------------------------------------------------------ bytes

@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_byte_specials_and_invalid_utf8():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (259, 256, 257, 258)
    ids = tok.encode("hé", add_bos=True) + [tok.eos_token_id]
    assert ids[0] == 256
    assert tok.decode(ids) == "hé"
    assert tok.decode(ids, skip_special=False) == "<|bos|>hé<|eos|>"
    assert tok.decode([0xC3]) == "\ufffd"  # truncated 2-byte sequence
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([259])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        ByteTokenizer(vocab_size=100)


def test_byte_save_reload(tmp_path):
    ByteTokenizer(vocab_size=320).save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 320
    assert tok.decode([300, 65]) == "A"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


# ------------------------------------------------------------------------------------ encode_batch

def test_encode_batch_left_and_right_padding():
    tok = ByteTokenizer()
    texts = ["ab", "abcd", ""]
    ids, mask = encode_batch(tok, texts)
    assert ids.shape == mask.shape == (3, 4) and ids.dtype == mask.dtype == torch.long
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert ids[0].tolist() == [258, 258, 97, 98]  # pad id, then the text
    assert ids[:2, -1].tolist() == [ord("b"), ord("d")]  # last real token sits at T-1

    ids, mask = encode_batch(tok, texts, add_bos=True, padding_side="right")
    assert ids.shape == (3, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ids[:, 0].tolist() == [256, 256, 256]
    assert ids[0].tolist() == [256, 97, 98, 258, 258]
    for row, m, text in zip(ids, mask, texts, strict=True):
        assert tok.decode(row[m.bool()]) == text


def test_encode_batch_pad_fallbacks_and_errors(bpe):
    ids, _ = encode_batch(bpe, ["the", "the depth layer"])  # pad falls back to <|pad|> found by name
    assert ids[0, 0].item() == bpe.pad_token_id == 1
    no_pad = HFTokenizer(bpe.backend, eos_token="<|endoftext|>")
    ids, _ = encode_batch(no_pad, ["the", "the depth layer"])
    assert ids[0, 0].item() == no_pad.eos_token_id == 0 and no_pad.pad_token_id is None
    ids, mask = encode_batch(ByteTokenizer(), [])
    assert ids.shape == mask.shape == (0, 0)
    with pytest.raises(ValueError, match="padding_side"):
        encode_batch(ByteTokenizer(), ["a"], padding_side="middle")
    with pytest.raises(TypeError, match="list"):
        encode_batch(ByteTokenizer(), "a single string")


# --------------------------------------------------------------------------------------- train_bpe

def test_train_bpe_round_trip_and_vocab_size(bpe):
    assert bpe.vocab_size <= 300
    assert bpe.vocab_size > 258  # it learned merges
    assert (bpe.eos_token_id, bpe.pad_token_id, bpe.bos_token_id) == (0, 1, None)
    for text in SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode("the depth token")) < len(b"the depth token")  # merges compress
    assert bpe.encode("the", add_bos=True) == bpe.encode("the")  # no bos token: add_bos is a no-op
    for bad in (-100, -1):  # an OverflowError
        with pytest.raises(ValueError, match=f"token id {bad} is negative"):
            bpe.decode([5, bad])
    assert bpe.decode([bpe.vocab_size + 3]) == ""  # a model's padded vocab past the tokenizer's: nothing, as in HF
    ids = bpe.encode("see <|endoftext|> inline")  # the documented exception: a special token's text is its id
    assert bpe.eos_token_id in ids and bpe.decode(ids) == "see  inline"
    assert bpe.decode(ids, skip_special=False) == "see <|endoftext|> inline"


def test_train_bpe_deterministic(corpus_file):
    a = train_bpe([corpus_file], vocab_size=280)
    b = train_bpe([str(corpus_file)], vocab_size=280)
    c = train_bpe(iter(_corpus().splitlines(keepends=True)), vocab_size=280)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.backend.get_vocab() == c.backend.get_vocab()
    text = _corpus(20, seed=1)
    assert a.encode(text) == b.encode(text) == c.encode(text)


def test_train_bpe_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_bpe(iter(["abc"]), vocab_size=200)
    with pytest.raises(FileNotFoundError, match="iter"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)


# ------------------------------------------------------------------------------ HF save and reload

def test_hf_save_reload_identical(bpe, tmp_path):
    bpe.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        bpe.vocab_size, bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id)
    for text in SAMPLES:
        assert tok.encode(text) == bpe.encode(text)
    ids = bpe.encode("the layer") + [bpe.eos_token_id]
    assert tok.decode(ids) == "the layer"
    assert tok.decode(torch.tensor(ids), skip_special=False) == "the layer<|endoftext|>"


def test_hf_matches_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.eos_token_id == bpe.eos_token_id and auto.pad_token_id == bpe.pad_token_id
    assert auto.bos_token_id is None
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ids
        assert auto.encode(text) == ids
        assert auto.decode(ids) == bpe.decode(ids) == text
    batch = auto(["the", "the depth layer"], padding=True, padding_side="left", return_tensors="pt")
    ids, mask = encode_batch(bpe, ["the", "the depth layer"])
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)


def _qwen_like_folder(bpe, folder, tokenizer_config=None, config=None):
    backend = bpe.backend
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    HFTokenizer(backend).save(folder)
    if tokenizer_config is None:
        (folder / "tokenizer_config.json").unlink()
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return backend


def test_special_tokens_from_config_files(corpus_file, tmp_path):
    bpe = train_bpe([corpus_file], vocab_size=300)  # fresh backend: this test adds tokens to it
    qwen = {"bos_token": None, "pad_token": "<|endoftext|>",
            "eos_token": {"content": "<|im_end|>", "special": True, "lstrip": False}}
    backend = _qwen_like_folder(bpe, tmp_path / "qwen", tokenizer_config=qwen)
    tok = load_tokenizer(tmp_path / "qwen")
    assert tok.bos_token_id is None
    assert tok.eos_token_id == backend.token_to_id("<|im_end|>")
    assert tok.pad_token_id == backend.token_to_id("<|endoftext|>")

    config = {"bos_token_id": 0, "eos_token_id": [backend.token_to_id("<|im_start|>"), 0]}
    _qwen_like_folder(bpe, tmp_path / "cfg", config=config)
    tok = load_tokenizer(tmp_path / "cfg" / "tokenizer.json")  # a file inside the folder works too
    assert tok.bos_token_id == 0
    assert tok.eos_token_id == backend.token_to_id("<|im_start|>")
    assert tok.encode("the", add_bos=True)[0] == 0

    _qwen_like_folder(bpe, tmp_path / "bad", tokenizer_config={"eos_token": "<|not_there|>"})
    with pytest.raises(ValueError, match="not_there"):
        load_tokenizer(tmp_path / "bad")


# ------------------------------------------------------------------------------------------- GPT-2

def _write_tiny_gpt2(folder):
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m.split()) for m in merges]
    encoder = {t: i for i, t in enumerate(tokens)}
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return encoder


def test_gpt2_tiny_vocab(tmp_path):
    encoder = _write_tiny_gpt2(tmp_path)
    tok = gpt2_tokenizer(tmp_path)
    assert tok.vocab_size == len(encoder) == 266
    assert tok.eos_token_id == tok.bos_token_id == encoder["<|endoftext|>"] == 265
    ids = tok.encode("hello world")
    assert [tok.backend.id_to_token(i) for i in ids] == ["hello", "Ġworld"]
    assert ids == [encoder["hello"], encoder["Ġworld"]]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi<|endoftext|>")[-1] == 265
    assert tok.decode(tok.encode("hi", add_bos=True)) == "hi"
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    assert load_tokenizer(tmp_path).encode("hello world") == ids


def test_gpt2_requires_endoftext(tmp_path):
    encoder = _write_tiny_gpt2(tmp_path)
    del encoder["<|endoftext|>"]
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(ValueError, match="endoftext"):
        gpt2_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------- load_tokenizer

def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")  # a file: its folder is searched, and the message says so
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer found in '{tmp_path}' \(the folder of the file "
                                                rf"'{tmp_path}/notes.txt'\): looked for"):
        load_tokenizer(tmp_path / "notes.txt")  # (it named only the folder: '.' for --tokenizer notes.txt)
    (tmp_path / "encoder.json").write_text("{}")  # vocab.bpe missing: not a GPT-2 folder
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*byte_tokenizer\.json.*vocab\.bpe.*'byte'"):
        load_tokenizer(tmp_path)
    (tmp_path / "byte_tokenizer.json").write_text(json.dumps({"type": "word"}))
    with pytest.raises(ValueError, match="not a ByteTokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(tmp_path)
