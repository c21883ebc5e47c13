"""One compute-accounting path for every model and method: the `ComputeLedger` of a forward.

Every layer branch records two figures per call, keyed by (slot, part), part in PARTS:
- `executed`: the FLOPs the kernels computed, from the shapes they were actually given: padded rows
  (PAD tokens, per-row padding to the longest subset), branches run densely with a masked output, and
  every (query, key) pair of an attention call with an explicit mask (SDPA computes masked pairs too;
  the causal fast path computes T(T+1)/2 pairs per row, as causal kernels skip the upper triangle).
  A test checks this figure against `torch.utils.flop_counter.FlopCounterMode`.
- `ideal`: the FLOPs the routing decisions require: valid (non-PAD) tokens that the method ran, and
  (query, key) pairs the causal mask makes visible to them. A perfect kernel would do exactly this.
and `tokens`, the valid tokens that ran the part (the per-layer fraction of tokens processed).

What counts as a FLOP is `core/flops.py`'s convention (matmuls and attention pairs; 2 per multiply-add).
Values are Python numbers or 0-dim tensors, so recording never syncs the host; reading does.

Forwards inside `accounting(False)` keep no ledger (no figures, no `flops/*` stats, fewer method statistics):
`generate` decodes so, as nobody reads a decode step's statistics and counting them costs a decode step, which
is bound by its number of ops, several small ops a layer. An explicit `accounting(True)` around it keeps them.
"""

from __future__ import annotations

import contextlib
import threading

import torch

PARTS = ("attn", "mlp", "gate", "router", "lm_head", "depth_attn", "experts", "exit", "adapter")
# depth_attn, experts, exit: a depth-recurrent model's depth attention, sparse expert attention (router included)
# and per-token exit check (models/dreamer.py); adapter: Huginn's input injection (models/huginn.py)


class _Setting(threading.local):
    """Per thread (a server's threads decode and score side by side): the explicit `accounting(...)` values in force,
    innermost last; None outside any."""

    def __init__(self) -> None:
        self.stack: list[bool | None] = [None]


_SETTING = _Setting()


@contextlib.contextmanager
def accounting(enabled: bool):
    """Whether forwards started inside keep a `ComputeLedger` (on by default), in this thread; nested, the innermost
    wins."""
    _SETTING.stack.append(bool(enabled))
    try:
        yield
    finally:
        _SETTING.stack.pop()


@contextlib.contextmanager
def accounting_off_by_default():
    """`accounting(False)` unless the caller chose explicitly (`generate`: an outer `accounting(True)` keeps it)."""
    with accounting(False) if _SETTING.stack[-1] is None else contextlib.nullcontext():
        yield


def accounting_enabled() -> bool:
    return _SETTING.stack[-1] is not False


def _num(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


class ComputeLedger:
    """Executed and ideal FLOPs of one forward, and the tokens each part ran, keyed by (slot, part).

    The lm_head is recorded with slot -1. Reading methods (`total`, `tokens_processed`, `report`)
    convert to Python floats, the only host sync.
    """

    def __init__(self) -> None:
        self.enabled = accounting_enabled()  # False (inside `accounting(False)`): `add` keeps nothing
        self._tables: tuple[dict, dict, dict] = ({}, {}, {})  # executed, ideal, tokens: (slot, part) -> value
        # Entries not yet summed into the tables. A layer call only appends here, and the forward loop sums them
        # after each call (`flush`), so a compiled layer finds the same empty list at every position: keying the
        # tables inside the call would make dynamo guard on their contents and recompile the layer per position.
        self.pending: list[tuple] = []
        self.closed = False  # the forward has ended (`close`): later calls are recomputations, not new work

    def add(self, slot: int, part: str, executed, ideal, tokens=None) -> None:
        """Add one call's FLOPs (and the valid tokens it ran, when it runs tokens) to (slot, part); ignored once the
        ledger is closed."""
        if part not in PARTS:
            raise ValueError(f"ledger part {part!r} is not one of {PARTS}.")
        if self.enabled and not self.closed:
            self.pending.append((slot, part, executed, ideal, tokens))

    def close(self) -> None:
        """End the forward's accounting: activation checkpointing runs layer calls again in backward, and those
        recomputations must not add to the forward's figures."""
        self.flush()
        self.closed = True

    def flush(self) -> None:
        """Sum the pending entries into the tables."""
        for slot, part, *values in self.pending:
            key = (slot, part)
            for table, value in zip(self._tables, values):
                if value is not None:  # a first entry is stored as given: no tensor op (decode steps are op-bound)
                    table[key] = table[key] + value if key in table else value
        self.pending.clear()

    @property
    def executed(self) -> dict:
        self.flush()
        return self._tables[0]

    @property
    def ideal(self) -> dict:
        self.flush()
        return self._tables[1]

    @property
    def tokens(self) -> dict:
        self.flush()
        return self._tables[2]

    def total(self, which: str = "executed", part: str | None = None, slot: int | None = None) -> float:
        """Sum of `which` ("executed" | "ideal") over the matching keys (all when part / slot are None)."""
        table = {"executed": self.executed, "ideal": self.ideal}[which]
        return sum(_num(v) for (s, p), v in table.items()
                   if (part is None or p == part) and (slot is None or s == slot))

    def total_tensor(self, which: str = "executed") -> torch.Tensor:
        """The same sum as a float64 tensor without a host sync (for `DecoderOutput.stats`)."""
        return sum_entries(list({"executed": self.executed, "ideal": self.ideal}[which].values()))

    def tokens_processed(self, slot: int, part: str) -> float:
        return _num(self.tokens.get((slot, part), 0))

    def slots(self) -> list[int]:
        return sorted({s for s, _ in self.executed if s >= 0})

    def report(self, valid_tokens: float | None = None) -> dict:
        """Plain floats: totals, per-part totals and, per slot, each part's FLOPs and the fraction of
        valid tokens it processed (`valid_tokens` given)."""
        out = {"executed": self.total("executed"), "ideal": self.total("ideal"), "parts": {}, "slots": {}}
        for part in PARTS:
            if any(p == part for _, p in self.executed):
                out["parts"][part] = {"executed": self.total("executed", part), "ideal": self.total("ideal", part)}
        for slot in self.slots():
            row = {}
            for (s, p) in self.executed:
                if s != slot:
                    continue
                row[p] = {"executed": self.total("executed", p, s), "ideal": self.total("ideal", p, s)}
                if valid_tokens and (s, p) in self.tokens:
                    row[p]["processed"] = self.tokens_processed(s, p) / valid_tokens
            out["slots"][slot] = row
        return out


def sum_entries(values: list) -> torch.Tensor:
    """A float64 tensor summing ledger values without a host sync, in a few ops whatever their number (a decode
    step is launch-bound): Python numbers added on the host, one-element tensors (on one device) in one stacked sum
    (integer counts exactly in int64, anything else in float64)."""
    number = float(sum(v for v in values if not torch.is_tensor(v)))
    tensors = [v if v.dim() == 0 else v.reshape(()) for v in values if torch.is_tensor(v)]  # one-element tensors
    if not tensors:
        return torch.tensor(number, dtype=torch.float64)
    if any(t.is_floating_point() for t in tensors):
        tensors = [t.double() for t in tensors]
    else:
        tensors = [t.long() for t in tensors]  # a no-op for int64 counts
    return torch.stack(tensors).sum().double() + number
