"""Tokenizers: a Hugging Face `tokenizer.json` wrapper, a byte-level fallback, local BPE training, GPT-2.

Every tokenizer has the same small surface (the `Tokenizer` protocol; no base class):
`encode(text, add_bos=False) -> list[int]`, `decode(ids, skip_special=True) -> str`, `vocab_size`,
`bos_token_id`, `eos_token_id`, `pad_token_id` (int or None) and `save(folder)`.
`encode_batch` turns a list of texts into padded `(B, T)` tensors; `load_tokenizer` picks the class.

`HFTokenizer` also has `encode_many(texts)` (the Rust batch API, parallel over texts), `chat_template`
(the Jinja template of `tokenizer_config.json` / `chat_template.jinja`, or None) and
`splits_before_words`, which says whether a text cut into pieces just before " word" (a space after a
non-space character, followed by a letter) encodes, piece by piece, to the ids of the whole text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer as _HFBackend
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
# Names tried, in order, when no config file names a special token.
_COMMON_NAMES = {
    "bos": ("<|bos|>", "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>"),
    "eos": ("<|eos|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
}


class Tokenizer(Protocol):
    """What the rest of dyndepth relies on; `HFTokenizer` and `ByteTokenizer` satisfy it structurally."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_bos: bool | None = False) -> list[int]: ...  # None: the tokenizer's own rule
    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str: ...
    def save(self, folder: str | Path) -> None: ...


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"decode takes one sequence (1-D ids), got a tensor of shape "
                             f"{tuple(ids.shape)}; decode each row separately.")
        return [int(i) for i in ids.tolist()] if ids.dim() == 1 else [int(ids.item())]
    return [int(i) for i in ids]


def encode_batch(tok: Tokenizer, texts: Sequence[str], add_bos: bool | None = False,
                 padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and pad `texts` -> `(input_ids (B, T), attention_mask (B, T))`, both int64; mask 1 = real token.
    `add_bos` as in `encode` (None: what the tokenizer's post-processor adds, as transformers encodes a prompt).

    Pads with `pad_token_id`, else `eos_token_id`, else 0. Left padding (the default) keeps the last real
    token of every row at position T-1, as generation needs.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if isinstance(texts, str):
        raise TypeError("encode_batch takes a list of texts, got a single str; wrap it in a list.")
    rows = [tok.encode(t, add_bos=add_bos) for t in texts]
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        start = width - len(row) if padding_side == "left" else 0
        input_ids[b, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, start:start + len(row)] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------------- bytes

class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; `<|bos|>`, `<|eos|>`, `<|pad|>` are 256, 257, 258.

    `vocab_size` may be larger than 259 (e.g. to round the embedding table); ids 259.. are unused and
    decode like special tokens. Invalid UTF-8 decodes with U+FFFD replacement characters.
    """

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")

    def __init__(self, vocab_size: int = 259):
        if vocab_size < 259:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 259 (256 bytes + 3 specials), "
                             f"got {vocab_size}.")
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 256, 257, 258

    def encode(self, text: str, add_bos: bool | None = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids  # (None: no post-processor, no BOS)

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in _as_id_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.vocab_size}).")
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                parts.append(self.SPECIALS[i - 256] if i < 259 else f"<|unused_{i}|>")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, folder: str | Path) -> None:
        """Write `byte_tokenizer.json`, which `load_tokenizer(folder)` reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"type": "byte", "vocab_size": self.vocab_size}
        (folder / BYTE_TOKENIZER_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    @classmethod
    def from_folder(cls, folder: str | Path) -> ByteTokenizer:
        path = Path(folder) / BYTE_TOKENIZER_FILE
        spec = json.loads(path.read_text())
        if spec.get("type") != "byte":
            raise ValueError(f"{path} is not a ByteTokenizer file (type={spec.get('type')!r}).")
        return cls(vocab_size=int(spec.get("vocab_size", 259)))


# ------------------------------------------------------------------------------------ Hugging Face

class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the names of its bos/eos/pad tokens (each a vocab string or None).

    `encode` never applies the backend's post-processor: `add_bos=True` prepends `bos_token_id` itself,
    and is a no-op when the tokenizer has no bos token (e.g. Qwen3).
    """

    def __init__(self, backend: _HFBackend, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.splits_before_words = _splits_before_words(backend)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary.")
        return idx

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """Load `folder/tokenizer.json`; special tokens come from the config files beside it, if any."""
        path = Path(folder) / "tokenizer.json"
        try:
            backend = _HFBackend.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot read {path} as a Hugging Face tokenizer.json: {e}") from e
        return cls(backend, **_find_special_tokens(backend, path.parent),
                   chat_template=_find_chat_template(path.parent))

    def encode(self, text: str, add_bos: bool | None = False) -> list[int]:
        """Ids of `text`; `add_bos=None`: what the tokenizer's post-processor adds (BOS for a Llama tokenizer, nothing
        for Qwen3's), as a transformers tokenizer's default encoding does."""
        if add_bos is None:
            return self.backend.encode(text, add_special_tokens=True).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text (no bos), tokenized in parallel by the Rust batch API."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        ids = _as_id_list(ids)
        bad = next((i for i in ids if i < 0), None)
        if bad is not None:  # the backend raised OverflowError (a -100 label); ids past the tokenizer's vocabulary (a
            # model's padded vocab can be larger) decode to nothing, as in transformers
            raise ValueError(f"token id {bad} is negative: not a token (labels masked with -100 are dropped before "
                             "decoding).")
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and a minimal `tokenizer_config.json` for `transformers.AutoTokenizer`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _find_chat_template(folder: Path) -> str | None:
    """`chat_template.jinja`, else tokenizer_config.json's `chat_template` (a string, or a list of
    {name, template} from which "default" is taken), else None."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if not (folder / "tokenizer_config.json").is_file():
        return None
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _splits_before_words(backend: _HFBackend) -> bool:
    """True for byte-level BPE whose pre-tokenizer begins a piece at " word" after a non-space (GPT-2's
    ByteLevel regex, or a Qwen/Llama-3 style Split regex then ByteLevel), with no normalizer other than
    NFC, no prefix space and no added token containing a space: a text cut there encodes piecewise to the
    same ids. Other tokenizers (SentencePiece/Metaspace, ...) answer False and are never cut."""
    spec = json.loads(backend.to_str())
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    if norm is not None and norm.get("type") != "NFC":
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
    split = [p for p in steps if p.get("type") == "Split"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space") or len(steps) != len(byte_level) + len(split):
        return False
    if split and (len(split) != 1 or split[0].get("behavior") != "Isolated" or split[0].get("invert")):
        return False
    if not split and not byte_level[0].get("use_regex", True):
        return False
    return not any(" " in t.content for t in backend.get_added_tokens_decoder().values())


def _token_name(value: object) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, {"content": ...}, or null."""
    return value.get("content") if isinstance(value, dict) else value  # type: ignore[return-value]


def _find_special_tokens(backend: _HFBackend, folder: Path | None = None) -> dict[str, str | None]:
    """bos/eos/pad names from tokenizer_config.json, special_tokens_map.json, config.json, then common names.

    The first file that mentions a role decides it, even when it says null (Qwen3 has no bos token).
    """
    sources: list[dict[str, str | None]] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json") if folder is not None else ():
        if (folder / name).is_file():
            d = json.loads((folder / name).read_text())
            sources.append({r: _token_name(d[f"{r}_token"]) for r in _COMMON_NAMES if f"{r}_token" in d})
    if folder is not None and (folder / "config.json").is_file():
        d = json.loads((folder / "config.json").read_text())
        found = {}
        for role in _COMMON_NAMES:
            idx = d.get(f"{role}_token_id")
            idx = idx[0] if isinstance(idx, list) and idx else idx  # eos_token_id may be a list
            if isinstance(idx, int):
                found[role] = backend.id_to_token(idx)
        sources.append(found)
    vocab = backend.get_vocab(with_added_tokens=True)
    sources.append({r: next((n for n in names if n in vocab), None) for r, names in _COMMON_NAMES.items()})
    return {f"{role}_token": next(s[role] for s in sources if role in s) for role in _COMMON_NAMES}


def _byte_level(model: models.Model) -> _HFBackend:
    backend = _HFBackend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe(files: Sequence[str | PathLike] | Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = ("<|endoftext|>",), min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE with the `tokenizers` library. Any text round-trips exactly, except that a special
    token's own text in it (e.g. a literal "<|endoftext|>") encodes to that token's id, as transformers' tokenizers
    do, which `decode` drops unless `skip_special=False`.

    `files` is a list/tuple of text-file paths, or any other iterable of strings (wrap an in-memory list
    of texts in `iter(...)`). The result has at most `vocab_size` tokens: the `special_tokens`
    (ids 0.., in order), the 256 byte tokens, then merges. Deterministic for the same input.
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                         f"+ {len(special_tokens)} special tokens.")
    backend = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if isinstance(files, (list, tuple)) and all(isinstance(f, (str, PathLike)) for f in files):
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"train_bpe: no such file(s): {missing[:3]}; to train on in-memory "
                                    "texts pass an iterator, e.g. train_bpe(iter(texts), ...).")
        backend.train([str(f) for f in files], trainer)
    else:
        backend.train_from_iterator(files, trainer)
    log.info("trained a byte-level BPE with %d tokens", backend.get_vocab_size())
    return HFTokenizer(backend, **_find_special_tokens(backend))


def gpt2_tokenizer(folder: str | Path) -> HFTokenizer:
    """GPT-2's byte-level BPE from OpenAI's `encoder.json` + `vocab.bpe`; bos = eos = `<|endoftext|>`."""
    folder = Path(folder)
    vocab, merges = models.BPE.read_file(str(folder / "encoder.json"), str(folder / "vocab.bpe"))
    if "<|endoftext|>" not in vocab:
        raise ValueError(f"{folder / 'encoder.json'} has no '<|endoftext|>' entry; GPT-2 files always do.")
    backend = _byte_level(models.BPE(vocab, merges))
    backend.add_special_tokens(["<|endoftext|>"])
    return HFTokenizer(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def for_vocab(tok, vocab_size: int):
    """`tok` for a model of `vocab_size` ids: a byte tokenizer widened to a padded vocabulary (demo-tiny has 264 ids:
    the ids past its 259 are unused and decode to nothing, where a sampled one raised), any other tokenizer as is."""
    if isinstance(tok, ByteTokenizer) and tok.vocab_size < vocab_size:
        return ByteTokenizer(vocab_size)
    return tok


def load_tokenizer(path: str | Path) -> HFTokenizer | ByteTokenizer:
    """`"byte"` -> ByteTokenizer(); a folder (or a file in it) with tokenizer.json -> HFTokenizer,
    byte_tokenizer.json -> ByteTokenizer, encoder.json + vocab.bpe -> GPT-2 BPE."""
    if str(path) == "byte":
        return ByteTokenizer()
    folder = Path(path)
    beside = ""
    if folder.is_file():
        folder, beside = folder.parent, f" (the folder of the file {str(path)!r})"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist; "
                                "pass a tokenizer folder or 'byte'.")
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(folder)
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.from_folder(folder)
    if (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file():
        return gpt2_tokenizer(folder)
    raise FileNotFoundError(
        f"no tokenizer found in {str(folder)!r}{beside}: looked for tokenizer.json (Hugging Face), "
        f"{BYTE_TOKENIZER_FILE} (ByteTokenizer) and encoder.json + vocab.bpe (GPT-2). Fix: point to a "
        "Hugging Face model folder, pass 'byte', or create one with train_bpe(...).save(folder).")
