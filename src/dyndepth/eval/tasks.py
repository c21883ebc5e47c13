"""Exact-match evaluation on the synthetic reasoning tasks, and loss split by token difficulty.

Shape legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dyndepth.data.synthetic import TERMINATOR, Example, answer_span, exact_match
from dyndepth.tokenizer import encode_batch


@torch.no_grad()
def generate_answers(model, tokenizer, examples: Sequence[Example], batch_size: int = 32,
                     max_new_tokens: int | None = None, **generate_kwargs) -> list[str]:
    """Greedy completions of each example's prompt, cut at the terminator (batched, left-padded)."""
    stop = tokenizer.encode(TERMINATOR)
    device = next(model.parameters()).device
    answers = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, mask = encode_batch(tokenizer, [e.prompt for e in chunk], padding_side="left")
        n = max_new_tokens or max(len(tokenizer.encode(e.answer)) for e in chunk) + len(stop) + 2
        out = model.generate(ids.to(device), n, attention_mask=mask.to(device), stop_tokens=stop[-1:],
                             **generate_kwargs)
        answers += [answer_text(tokenizer, row[ids.shape[1]:].tolist(), stop[-1]) for row in out.cpu()]
    return answers


def answer_text(tokenizer, new: list[int], stop_id: int) -> str:
    """A generated continuation as scored text: up to its stop token or the tokenizer's EOS (then padding), special
    ids written out (`<|endoftext|>`) and ids past the tokenizer's vocabulary (a model's padded one: demo-tiny has 264
    for the byte tokenizer's 259) as U+FFFD, so that an answer interrupted by either never matches (dropped, a "1",
    an unused id and a "2" read "12")."""
    ends = [i for i, t in enumerate(new) if t in (stop_id, tokenizer.eos_token_id)]
    new = new[:ends[0] + (new[ends[0]] == stop_id)] if ends else new  # (the terminator is the answer's end mark)
    pieces, run = [], []
    for t in new + [None]:
        if t is not None and 0 <= t < tokenizer.vocab_size:
            run.append(t)
            continue
        pieces.append(tokenizer.decode(run, skip_special=False))
        pieces, run = pieces + (["\ufffd"] if t is not None else []), []
    return "".join(pieces)


def task_accuracy(model, tokenizer, examples: Sequence[Example], batch_size: int = 32, **kw) -> dict[str, float]:
    """Exact-match accuracy per task (and "overall")."""
    return exact_match(examples, generate_answers(model, tokenizer, examples, batch_size, **kw))


@torch.no_grad()
def loss_by_difficulty(model, tokenizer, examples: Sequence[Example], batch_size: int = 32) -> dict[str, float]:
    """Mean next-token loss on answer tokens ("hard") versus prompt tokens ("easy").

    Adaptive depth should spend its compute where the first is high; the gap is the motivation.
    """
    device = next(model.parameters()).device
    sums = {"answer": 0.0, "prompt": 0.0}
    counts = {"answer": 0, "prompt": 0}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        rows, hard = [], []
        for e in chunk:
            start, end = answer_span(e)
            easy_ids, hard_ids = tokenizer.encode(e.text[:start]), tokenizer.encode(e.text[start:end])
            rows.append(easy_ids + hard_ids)
            hard.append([False] * len(easy_ids) + [True] * len(hard_ids))
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        is_hard = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, (row, h) in enumerate(zip(rows, hard)):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = True
            is_hard[r, :len(row)] = torch.tensor(h)
        logits = model(ids.to(device), attention_mask=mask.long().to(device)).logits.float().cpu()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        target_ok = mask[:, 1:]
        for name, sel in (("answer", is_hard[:, 1:] & target_ok), ("prompt", ~is_hard[:, 1:] & target_ok)):
            sums[name] += float(nll[sel].sum())
            counts[name] += int(sel.sum())
    return {k: sums[k] / max(counts[k], 1) for k in sums}
