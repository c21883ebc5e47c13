"""The forward context every layer receives, the causal masks built from it, and sub-contexts for token subsets.

Shape legend: B batch, T tokens, K tokens of a per-row subset, S key / cache length, H head_dim.

A context is built once per model forward (`CausalLM.make_context`) and passed explicitly to every layer
call; nothing is stashed on modules between calls. Methods that run a layer on a subset of tokens (MoD's
routed tokens, DND's nested pass) derive a sub-context with `ForwardContext.subset`, so the layer's own
branches run unchanged on (B, K, D) and causality, documents and the cache follow one rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dyndepth.core.accounting import ComputeLedger
from dyndepth.core.cache import KVCache
from dyndepth.core.routing import gather_padded

if TYPE_CHECKING:
    from dyndepth.core.method import Method


class ForwardContext:
    """Everything a layer needs besides its input, built once per forward and passed explicitly.

    positions (B, T): sequence position of every token (RoPE angle and cache column).
    valid (B, T) | None: False marks PAD; None means every token is real.
    cos, sin (B, T, H): rotary tables for `positions`; `rope(positions)` makes them for other positions.
    attn_mask (B, 1, T, T) | None: for cache-free calls with padding, documents or custom positions;
      None means SDPA's causal fast path (positions 0..T-1 in every row; in a subset, the valid entries first, in
      position order).
    cache: the KV cache or None. doc_ids (B, T) | None: packed-document ids (training only).
    training: a training forward (method losses, MoE router statistics for the balancing loss); never one with a
      cache (`make_context`: a cached forward decodes, whatever the module mode).
    method / state: the attached adaptive-depth method and its per-forward state (its own dataclass).
    ledger: executed and ideal FLOPs of this forward (see core/accounting.py).
    aux: MoE router statistics, for the balancing loss of a training forward.
    kv_hook: optional (slot, k, v) -> (k, v), set by a method for one forward (GateSkip copy_prev).
    cache_source (B, T) | None: the tokens' sequence positions when `positions` are not (a sub-context with
      compact positions, DND's nested pass); the cache records them so `invalidate` works on either.
    model_state: what the model family keeps for one forward (Dreamer's depth memory); None for the decoder.
    ordered: positions strictly increase along each row over its valid tokens (`make_context` sets it when it
      derived the positions itself), so a subset packed in column order is causal by column.
    entries (rows (N,), cols (N,)) | None: a padded subset's valid entries, flat (`subset(..., entries=True)`):
      attention projects q, k, v and o for these only.
    also_read: int | None: with a cache, attention also attends to this slot's entries, in one softmax with
      the entries of the slot it runs at (`also_reading`).

    A plain class on purpose, not a dataclass: wrappers that map over a layer's arguments (FSDP2's input
    casting) rebuild dataclasses field by field, and every layer must see this very object, whose
    state, ledger and statistics it fills in.
    """

    def __init__(self, positions: torch.Tensor, valid: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                 doc_ids: torch.Tensor | None = None, training: bool = False,
                 rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 method: Method | None = None, state: Any = None, ledger: ComputeLedger | None = None,
                 aux: list | None = None, kv_hook: Callable | None = None,
                 cache_source: torch.Tensor | None = None, model_state: Any = None) -> None:
        self.positions, self.valid, self.cos, self.sin = positions, valid, cos, sin
        self.attn_mask, self.cache, self.doc_ids, self.training = attn_mask, cache, doc_ids, training
        self.rope, self.method, self.state = rope, method, state
        self.ledger = ComputeLedger() if ledger is None else ledger
        self.aux = [] if aux is None else aux
        self.kv_hook, self.cache_source, self.model_state = kv_hook, cache_source, model_state
        self.ordered = False
        self.entries: tuple[torch.Tensor, torch.Tensor] | None = None
        self.also_read: int | None = None
        self._all: torch.Tensor | None = None  # valid_or_all's all-True mask, made on first use

    @property
    def traced_decode(self) -> bool:
        """A cached one-token-per-row forward that torch.compile traces (a compiled decode step, CUDA graphs on a
        GPU): methods decide by masks there, never by a host read, so the step stays one static graph."""
        return torch.compiler.is_compiling() and self.cache is not None and self.positions.shape[1] == 1

    @property
    def valid_or_all(self) -> torch.Tensor:
        """(B, T) bool: `valid`, or all True (made once per context: a decode step asks for it per layer)."""
        if self.valid is not None:
            return self.valid
        if self._all is None or self._all.shape != self.positions.shape:
            self._all = torch.ones(self.positions.shape, dtype=torch.bool, device=self.positions.device)
        return self._all

    def subset(self, idx_BK: torch.Tensor, valid_BK: torch.Tensor, positions_BK: torch.Tensor | None = None,
               entries: bool = False) -> ForwardContext:
        """The context of a per-row token subset, packed as `core.routing.pack_indices` / `pack_padded` pack it:
        each row's columns ascending, its valid entries first.

        The subset's tokens keep their own positions, or take `positions_BK` (increasing along each row's valid
        entries, e.g. DND's compact positions 0..K-1), with rotary tables to match. Without a cache they attend
        causally to each other only, within their documents; with a cache, to the valid entries of the slot they
        are run with (the caller picks the slot). Cache, ledger and MoE statistics are shared with the parent, so
        everything the subset runs is counted in the same forward. The method is not carried over: a
        sub-context runs the plain layer (`layer.block`).

        Without a cache or documents, in an `ordered` parent, the subset needs no mask: causality by position is
        causality by column there, so SDPA's causal kernel is exact for the valid queries (and skips the pairs
        above the diagonal that a boolean mask computes); the padding after them is seen by padding queries
        alone. `entries=True` lists the valid entries (one host sync) when rows are padded, so attention projects
        only those (DND: rows select different counts).
        """
        source_BK = self.positions.gather(1, idx_BK)  # (B, K) the tokens' sequence positions
        if positions_BK is None:
            positions_BK = source_BK
            cos, sin = gather_padded(self.cos, idx_BK), gather_padded(self.sin, idx_BK)  # (B, K, H)
        else:
            if self.rope is None:
                raise ValueError("this context has no rope function, so a subset cannot take new positions.")
            cos, sin = self.rope(positions_BK)
        doc_BK = None if self.doc_ids is None else self.doc_ids.gather(1, idx_BK)
        mask = None
        if self.cache is None and (doc_BK is not None or not self.ordered):
            mask = causal_mask(positions_BK, positions_BK, valid_BK, valid_BK, doc_BK)  # (B, 1, K, K)
        sub = ForwardContext(positions_BK, valid_BK, cos, sin, mask, self.cache, doc_BK, self.training,
                             self.rope, ledger=self.ledger, aux=self.aux, model_state=self.model_state,
                             cache_source=None if positions_BK is source_BK else source_BK)
        sub.ordered = self.ordered
        if entries:
            rows_N, cols_N = valid_BK.nonzero(as_tuple=True)  # (N,) each; one host sync
            if rows_N.numel() < valid_BK.numel():  # rows padded to the longest
                sub.entries = rows_N, cols_N
        return sub

    def also_reading(self, slot: int) -> ForwardContext:
        """This context (a shallow copy: the same tensors, ledger and state) whose attention also attends to the
        cache entries of `slot`: DND's TaH-style nested pass (`nested_attends_vanilla`) reads the layer's vanilla
        K/V there. Both slots must hold their tokens at their sequence positions (causality is by column)."""
        if self.cache is None:
            raise ValueError("also_reading needs a cache: without one there is no other slot to read.")
        ctx = self.copy()
        ctx.also_read = slot
        return ctx

    def copy(self) -> ForwardContext:
        """A shallow copy: the same tensors, cache, ledger and state. Made attribute by attribute, not by
        `copy.copy`, which torch 2.11's dynamo refuses to trace (a compiled decode step copies contexts)."""
        ctx = ForwardContext(self.positions, self.valid, self.cos, self.sin, self.attn_mask, self.cache, self.doc_ids,
                             self.training, self.rope, self.method, self.state, self.ledger, self.aux, self.kv_hook,
                             self.cache_source, self.model_state)
        ctx.ordered, ctx.entries, ctx.also_read, ctx._all = self.ordered, self.entries, self.also_read, self._all
        return ctx

    def rows(self, rows_M: torch.Tensor) -> ForwardContext:
        """The context of batch rows `rows_M` (M,): for a method that runs a branch on some rows only (DND's
        nested pass while decoding, where most rows select nothing). Cache (`KVCache.rows`), ledger and MoE
        statistics are shared with the parent; `model_state` is passed on as is; no method, as for `subset`."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows_M)

        return ForwardContext(pick(self.positions), pick(self.valid), pick(self.cos), pick(self.sin),
                              pick(self.attn_mask), None if self.cache is None else self.cache.rows(rows_M),
                              pick(self.doc_ids), self.training, self.rope, ledger=self.ledger, aux=self.aux,
                              cache_source=pick(self.cache_source), model_state=self.model_state)


def causal_mask(q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor, k_valid_BS: torch.Tensor | None,
                q_valid_BT: torch.Tensor | None = None, doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: key s is visible to query t if it is valid and not later in position
    (`k_pos_BS` may be (1, S): the same key positions for every row).

    Causality is by position, never by storage order, so left padding, packed subsets and cache
    columns all follow one rule. `doc_ids` (queries and keys are the same tokens) also hides other
    documents of a packed row. PAD queries see every key: their outputs are discarded, and a row
    with no visible key would make SDPA return NaN.
    """
    mask = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]  # (B, T, S)
    if k_valid_BS is not None:  # (validity as bool: `~` on an int 0 / 1 mask gives -1 / -2, an additive mask)
        mask = mask & k_valid_BS.bool()[:, None, :]
    if doc_ids_BT is not None:
        mask = mask & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
    if q_valid_BT is not None:
        mask = mask | ~q_valid_BT.bool()[:, :, None]
    return mask[:, None]  # (B, 1, T, S)


def subset_mask(q_pos_BK, k_pos_BT, k_valid_BT, q_valid_BK, q_doc_BK=None, k_doc_BT=None) -> torch.Tensor:
    """causal_mask for queries that are a subset of the keys (documents compared separately)."""
    mask = causal_mask(q_pos_BK, k_pos_BT, k_valid_BT, None)  # (B, 1, K, T)
    if q_doc_BK is not None:
        mask = mask & (q_doc_BK[:, None, :, None] == k_doc_BT[:, None, None, :])
    if q_valid_BK is not None:
        mask = mask | ~q_valid_BK.bool()[:, None, :, None]
    return mask
