"""Perplexity and bits per byte of a text, with a sliding window (after the Hugging Face perplexity guide; its
windows keep more context, see below).

Shape legend: B batch (windows), T tokens, V vocab.

The text is tokenized once, behind a prefix token (BOS, else EOS; so its first token is scored too), and
covered by windows of at most `max_length` tokens that move `stride` tokens at a time. Each window
scores only the tokens that no earlier window scored, so every token is predicted exactly once, with
at least max_length - stride + 1 tokens of context (all earlier tokens near the start). stride ==
max_length gives disjoint windows (fastest, least context; the same numbers as lm-eval's rolling
log-likelihood when the tokenizer adds no BOS of its own: lm-eval encodes the text with the tokenizer's special
tokens, so behind a Llama tokenizer's <s> it also scores a second <s>); a smaller stride gives more context per
token for more compute. Windows run in batches, each at positions 0..len-1, as the guide does.

perplexity = exp(NLL / tokens); bits per byte = NLL / (ln 2 * UTF-8 bytes), comparable across
tokenizers; word perplexity = exp(NLL / whitespace-separated words).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dyndepth.config import position_limit, position_limit_name
from dyndepth.data.sources import read_utf8
from dyndepth.generation import check_finite


@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    words: int  # whitespace-separated words of the text
    max_length: int
    stride: int

    @property
    def perplexity(self) -> float:
        return _exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    @property
    def word_perplexity(self) -> float:
        return _exp(self.nll / self.words)

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "word_perplexity": self.word_perplexity}


def _exp(x: float) -> float:
    """e**x, inf past float's range: math.exp raised OverflowError from ~709.8 nats (an untrained byte model's 5.5 nats
    a token over a 130-character word), after every window was scored, and the whole report was lost."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) over n tokens: the input tokens[begin:end] (at most max_length) predicts
    tokens[begin + 1:end + 1], of which the last `scored` are this window's targets.

    Targets are tokens 1..n-1, each exactly once: the first window predicts the first max_length of them,
    each later window the next `stride` with the max_length tokens before its last target as input.
    With stride == max_length this is lm-eval's `loglikelihood_rolling` windowing.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must lie in [1, max_length={max_length}]; "
                         "a larger stride would leave tokens unscored.")
    out, first = [], 1  # `first`: the next token to predict
    while first < n:
        stop = min(first + (max_length if first == 1 else stride), n)  # targets [first, stop)
        out.append((max(0, stop - 1 - max_length), stop - 1, stop - first))
        first = stop
    return out


@torch.no_grad()
def sliding_window_nll(model, ids: Sequence[int] | torch.Tensor, max_length: int, stride: int,
                       batch_size: int = 8, progress: bool = False,
                       record: Callable[[dict], object] | None = None) -> tuple[float, int]:
    """Summed NLL (nats) of ids[1:], each token given the input of the window that scores it (`windows`),
    and how many tokens that is. Runs `model` with `num_logits`, so only the scored positions reach lm_head;
    `record`, if given, receives each forward's statistics (`out.stats`)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    device = next(model.parameters()).device
    spans = windows(len(ids), max_length, stride)
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:  # equal-length windows batch without padding
        by_len.setdefault(span[1] - span[0], []).append(span)
    total, count = 0.0, 0
    bar = tqdm(total=len(spans), disable=not progress, desc="perplexity windows")
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            inputs = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)  # (B, T)
            k = max(s for _, _, s in chunk)
            out = model(inputs, num_logits=k)
            if record is not None:
                record(out.stats)
            logits = out.logits.float()  # (B, k, V): predicts the k tokens after
            # (a float16 overflow gave a NaN perplexity, reported as a number; the loop reads the device per row anyway)
            check_finite(logits, model, "the logits of a perplexity window")
            for row, (_, end, scored) in enumerate(chunk):
                targets = ids[end + 1 - scored:end + 1].to(device)  # (scored,)
                total += float(F.cross_entropy(logits[row, -scored:], targets, reduction="sum"))
                count += scored
            bar.update(len(chunk))
    bar.close()
    return total, count


def window_of(model, max_length: int | None = None, stride: int | None = None) -> tuple[int, int]:
    """(max_length, stride) of `text_perplexity`, defaults filled in and checked against the model (`dyndepth eval`
    checks them before its lm-eval tasks run, so a bad one does not fail after them)."""
    for name, value in (("max_length", max_length), ("stride", stride)):
        if value is not None and value < 1:  # 0 read as "the default" before
            raise ValueError(f"{name}={value} must be >= 1 (leave it unset for the default).")
    positions = position_limit(model.config)
    max_length = max_length or min(positions, 2048)
    if max_length > positions:
        raise ValueError(f"max_length={max_length} exceeds the model's {position_limit_name(model.config)}; pass a "
                         "smaller --max-length.")
    stride = stride or max(max_length // 2, 1)
    if stride > max_length:
        raise ValueError(f"stride={stride} must lie in [1, max_length={max_length}]; "
                         "a larger stride would leave tokens unscored.")
    return max_length, stride


def text_perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None,
                    batch_size: int = 8, progress: bool = False,
                    record: Callable[[dict], object] | None = None) -> Perplexity:
    """Perplexity of `text` (see the module docstring). max_length defaults to the model's context, at
    most 2048; stride to max_length // 2; `record` as in `sliding_window_nll`."""
    if batch_size < 1:  # 0 failed in range(), a negative one divided by zero
        raise ValueError(f"batch_size={batch_size} must be a positive integer.")
    max_length, stride = window_of(model, max_length, stride)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer.encode(text)
    if not ids or not text.split():  # (word perplexity divides by the words)
        raise ValueError("the text is empty or only whitespace; nothing to score.")
    stream = ids if prefix is None else [prefix, *ids]  # no special token: the first token goes unscored
    nll, n = sliding_window_nll(model, stream, max_length, stride, batch_size, progress, record)
    return Perplexity(nll, n, len(text.encode("utf-8")), len(text.split()), max_length, stride)


def file_perplexity(model, tokenizer, path: str | Path, limit: int | None = None, **kwargs) -> Perplexity:
    """`text_perplexity` of a UTF-8 text file (e.g. WikiText-2's test.txt): read whole, or with `limit`, up to the
    end of its limit-th non-empty line (a quick run; bytes and words count that part only)."""
    text = read_text_file(path)
    return text_perplexity(model, tokenizer, text if limit is None else first_lines(text, limit), **kwargs)


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file, whole; a missing file or one in another encoding is an error naming it (`dyndepth eval`
    reads its perplexity files once before any lm-eval task, so that neither fails after them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    return read_utf8(path)


def first_lines(text: str, n: int) -> str:
    """`text` up to the end of its n-th non-empty line (the blank lines between them kept)."""
    if n < 1:
        raise ValueError(f"limit={n} must be >= 1 (lines to score; leave it unset for the whole text).")
    lines = text.splitlines(keepends=True)
    seen = 0
    for i, line in enumerate(lines):
        seen += bool(line.strip())
        if seen == n:
            return "".join(lines[:i + 1])
    return text
