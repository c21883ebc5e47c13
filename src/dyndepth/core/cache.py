"""A static, preallocated KV cache keyed by *slot* (one application of a layer), with per-entry validity.

Shape legend: L slots, B batch, G kv heads, S cache length, H head_dim, T tokens written by one call.

Layout: one tensor per slot, `keys[l]`, `values[l]` `(B, G, S + 1, H)`, `valids[l]` and `sources[l]` `(B, S + 1)`
(separate tensors, not views of one: a compiled decode step then writes each in place, where writing into a
view of a shared buffer made torch.compile copy the whole buffer every step). Entry `s` of a row
holds the token written at column `s`: its sequence position for every slot but DND's nested slots with
compact positions (column = the token's rank among the selected tokens). `source` records the sequence
position of the token each entry came from, so `invalidate` can drop everything at or after a position
(speculative rollback, re-prefill) whatever the column layout. Positions are explicit; nothing advances
implicitly. Column `S` is a scratch column: writes that must not land (PAD tokens, or tokens a method
marks as not writing) are sent there, so every write is one branch-free `index_put_` and shapes never
depend on data. Readers only ever see the first `S` columns.

How methods use it (the contract each method's docstring restates):
- Plain model: slot i = layer i; every valid token writes K/V at its position.
- GateSkip (default K/V policy): a token that skips the attention branch still runs k_proj/v_proj on its
  unchanged residual stream and writes them, so later queries see a complete row; only its q/o work
  is saved. The validity mask stays all-True for real tokens.
- Mixture-of-Depths: only routed tokens write (`write_mask` = routed); the others stay invalid at that
  slot, so later queries at that slot never attend to them.
- DND: the nested second pass of layer i is its own slot; only the selected tokens write there, at
  the columns the method assigns (compact: the count of earlier selected tokens, `count`). The first
  pass keeps the plain slot. With `nested_attends_vanilla` the nested pass also reads the plain slot
  (`ForwardContext.also_reading`): one softmax over both slots' entries, each at its token's position.
- Depth-recurrent models (Dreamer): one slot per (layer, recurrence step). State that is not K/V
  (depth attention over a token's own history) lives with the token, never in this cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_slots: int,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len + 1, head_dim)
        columns = torch.arange(max_seq_len + 1, device=device)  # (S+1,)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_slots)]  # L x (B, G, S+1, H)
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_slots)]
        self.valids = [torch.zeros(batch_size, max_seq_len + 1, dtype=torch.bool, device=device)  # L x (B, S+1)
                       for _ in range(num_slots)]
        self.sources = [columns.expand(batch_size, -1).clone() for _ in range(num_slots)]  # column = position
        self.sourced: set[int] = set()  # slots written with an explicit source (compact columns); see `update`
        self.columns = columns  # key positions of the plain layout, for causal masks
        self.batch_rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1) row index for writes
        self.max_seq_len = max_seq_len
        self.length = max_seq_len  # how many columns readers see; see `window`
        self.row_index: torch.Tensor | None = None  # the batch rows this view covers; see `rows`

    @classmethod
    def for_model(cls, config, batch_size: int, max_seq_len: int, num_slots: int | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> "KVCache":
        slots = config.num_hidden_layers if num_slots is None else num_slots
        return cls(slots, batch_size, max_seq_len, config.num_key_value_heads, config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.row_index is None else self.row_index.numel()

    # Stacked copies for inspection (tests, analysis): (L, B, G, S+1, H) and (L, B, S+1). Writes go through `update`.
    @property
    def k(self) -> torch.Tensor:
        return torch.stack(self.keys)

    @property
    def v(self) -> torch.Tensor:
        return torch.stack(self.values)

    @property
    def valid(self) -> torch.Tensor:
        return torch.stack(self.valids)

    @property
    def source(self) -> torch.Tensor:
        return torch.stack(self.sources)

    def window(self, length: int) -> "KVCache":
        """A view that shares the buffers but lets readers see only the first `length` positions.

        The generate loop, which knows the longest position written so far, uses this in eager mode so
        attention does not scan the unused tail; compiled decoding keeps the full, static length.
        """
        if not 0 < length <= self.max_seq_len:
            raise ValueError(f"window length {length} is outside 1..{self.max_seq_len} (the cache's size).")
        view = object.__new__(KVCache)
        view.keys, view.values, view.valids, view.sources = self.keys, self.values, self.valids, self.sources
        view.sourced, view.columns, view.batch_rows = self.sourced, self.columns, self.batch_rows
        view.max_seq_len, view.length, view.row_index = self.max_seq_len, length, self.row_index
        return view

    def rows(self, rows_M: torch.Tensor) -> KVCache:
        """A view of batch rows `rows_M` (M,) of this cache (or view): `update` writes into those rows of the shared
        buffers and returns them gathered, `count` counts them, `invalidate` drops their entries. For a method that
        runs a branch on M of B rows while decoding (DND's nested pass). `reset` acts on the whole cache."""
        view = self.window(self.length)
        view.row_index = rows_M if self.row_index is None else self.row_index[rows_M]
        view.batch_rows = view.row_index[:, None]
        return view

    def update(
        self,
        slot: int,
        k_BTGH: torch.Tensor,
        v_BTGH: torch.Tensor,
        positions_BT: torch.Tensor,
        write_BT: torch.Tensor | None = None,
        source_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write K/V of T tokens at columns `positions_BT` (where `write_BT` is True); return the slot's view.

        `source_BT` is the tokens' sequence position when the columns are not (DND compact positions).
        Returns `k (B, G, S', H)`, `v (B, G, S', H)` and `valid (B, S')`, S' = `self.length`; entry s
        holds column s, so a causal query at column p may attend to entries `valid & (s <= p)`.
        """
        idx_BT = positions_BT
        if write_BT is not None:
            idx_BT = torch.where(write_BT, positions_BT, self.max_seq_len)  # unwritten -> scratch column
        rows_B1 = self.batch_rows  # (B, 1), broadcast against idx_BT
        k_buf, v_buf, valid_buf = self.keys[slot], self.values[slot], self.valids[slot]  # (B, G, S+1, H), (B, S+1)
        k_buf[rows_B1, :, idx_BT] = k_BTGH.to(k_buf.dtype)  # advanced indices first: (B, T, G, H)
        v_buf[rows_B1, :, idx_BT] = v_BTGH.to(v_buf.dtype)
        valid_buf[rows_B1, idx_BT] = True
        if source_BT is not None:
            self.sourced.add(slot)
        if slot in self.sourced:  # otherwise the entry's source is its column, as initialized
            self.sources[slot][rows_B1, idx_BT] = positions_BT if source_BT is None else source_BT
        return self.read(slot)

    def read(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slot's view as `update` returns it, writing nothing: `k`, `v` (B, G, S', H) and `valid` (B, S')."""
        S = self.length
        k_buf, v_buf, valid_buf = self.keys[slot], self.values[slot], self.valids[slot]
        if self.row_index is not None:  # a row view: its rows, gathered
            rows_B = self.row_index
            return k_buf[rows_B, :, :S], v_buf[rows_B, :, :S], valid_buf[rows_B, :S]
        return k_buf[:, :, :S], v_buf[:, :, :S], valid_buf[:, :S]

    def count(self, slot: int) -> torch.Tensor:
        """Valid entries per row at `slot` (B,): the next compact column of a sparse slot."""
        valid = self.valids[slot][:, : self.max_seq_len]
        return (valid if self.row_index is None else valid[self.row_index]).sum(-1)

    def invalidate(self, from_position: torch.Tensor | int, slots: list[int] | None = None) -> None:
        """Drop every entry that came from a token at sequence position >= `from_position` ((B,) or an int),
        in all slots or the given ones; in a row view (`rows`), of its rows only. Speculative decoding calls it
        before re-writing rejected positions, so a sparse slot (MoD, DND nested) never keeps a stale entry of a
        rejected token."""
        start = torch.as_tensor(from_position, device=self.valids[0].device)
        if start.dim() != 2:
            start = start.reshape(-1, 1)  # (B, 1) or (1, 1)
        for s in range(len(self.valids)) if slots is None else slots:
            if self.row_index is None:
                self.valids[s] &= self.sources[s] < start
            else:
                rows = self.row_index
                self.valids[s][rows] = self.valids[s][rows] & (self.sources[s][rows] < start)

    def rewrite_from(self, positions_BT: torch.Tensor, valid_BT: torch.Tensor | None, slots: list[int]) -> None:
        """A cached forward rewrites each row from its first position on: drop the sparse `slots`' entries of tokens at
        or after it. A dense slot is overwritten in place, but a sparse one holds only some tokens (MoD's routed ones,
        DND's nested ones at compact columns counted from the valid entries), so feeding a position again (a re-sent
        token, a rejected draft) without `invalidate` kept the old entry: a stale key, or a duplicate one with every
        later compact column shifted. A row of PAD only drops nothing. Two ops per slot."""
        if valid_BT is not None:
            positions_BT = positions_BT.masked_fill(~valid_BT, self.max_seq_len)
        self.invalidate(positions_BT.amin(1, keepdim=True), slots)

    def reset(self) -> None:
        """Empty every slot, as a new cache (`generate(cache=...)` reuses a caller's cache this way)."""
        for k, v, valid, source in zip(self.keys, self.values, self.valids, self.sources):
            k.zero_(), v.zero_(), valid.zero_()
            source.copy_(self.columns.expand_as(source))
        self.sourced.clear()
        self.length = self.max_seq_len

    def check_writable(self) -> None:
        """ValueError when this cache cannot be written here: one made under torch.inference_mode holds inference
        tensors, which torch lets nothing update in place outside that mode (its error came from the first write)."""
        if self.keys[0].is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError("the KV cache was made under torch.inference_mode, and torch writes its buffers only "
                             "there: run this generate / forward under torch.inference_mode() too, or make the cache "
                             "outside it (then it serves both ways).")

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a write mutates (keys, values, validity, sources)."""
        return [*self.keys, *self.values, *self.valids, *self.sources]

    def nbytes_per_token(self) -> int:
        """Bytes of K and V stored per token position, summed over slots and kv heads (one batch row)."""
        _, G, _, H = self.keys[0].shape
        return 2 * len(self.keys) * G * H * self.keys[0].element_size()
