"""Self-speculative decoding for GateSkip (paper section 7): the same model drafts with a high skip budget
and verifies with full compute.

Shape legend: B batch, T prompt length, K drafted tokens per step (<= num_draft), V vocab.

One step, per row, with `cur` the last emitted token at position `pos` (emitted but not yet in the cache):
  1. draft: K forwards of one token each under `method.decoding(draft_budget)` (calibrated thresholds),
     feeding cur, d1, ..., d_{K-1} at pos, ..., pos+K-1 and proposing d1..dK;
  2. verify: ONE full-compute forward (budget 0) over [cur, d1..dK] at pos..pos+K;
  3. accept the longest prefix d1..dn the verifier agrees with (greedy: argmax equal; sampling: the
     standard rejection rule, `speculative_accept`), then emit d1..dn plus one token from the verifier
     (the correction at the first disagreement, or the bonus token after dK). The row's next `cur` is
     that token, at pos + n + 1.

Why the output equals full-compute generation: every verifier logit at position p comes from a query
that sees cache entries s <= p only (the causal mask). Entries s < pos were written by earlier
verifications of accepted tokens (full compute, in context), and entries pos..pos+K are written by this
very verification before attention reads them (`KVCache.update` writes, then returns the view), after
the verification has first invalidated every entry at or after pos in every slot (`KVCache.invalidate`).
So the verifier never reads a draft-computed or rejected entry, in dense slots or sparse ones. The logits at pos+j are
therefore those of a full-compute forward over the accepted prefix plus d1..dj (up to float rounding
from the block shape, which plain one-token decoding has relative to a full forward too).

Caches (`cache_mode`):
- "shared" (default): one KVCache. The draft writes its K/V at pos..pos+K-1; the verification then
  overwrites all of pos..pos+K with full-compute K/V (GateSkip's default K/V policy makes every token
  write K/V at every slot, and full compute skips nothing). By the argument above the verifier is exact,
  and the draft reads full-compute K/V for the whole accepted context, which raises acceptance.
- "separate": the draft keeps its own KVCache, filled only by draft compute (its own prefill included).
  Accepted tokens' entries there came from draft compute: acceptable, because the draft only proposes
  and the verifier's cache alone defines the output. Each draft phase first invalidates the draft cache
  from pos - 1 on, so rejected drafts' entries are gone before it writes. One gap needs care: when all K drafts
  are accepted, dK was never fed to the draft, so each draft phase starts with a 2-token forward
  [token at pos-1, cur] at [pos-1, pos]; rewriting the entry at pos-1 with the same token in the same
  context is harmless (threshold-mode skip decisions are per token, so it is recomputed identically).

Batching: acceptance is per row. Positions are per row already, so each row advances by its own
n + 1; all rows draft the same K per step (one batched forward), so a row that rejects early wastes
its remaining draft slots, but nobody is held back to the slowest row (the "minimum count over rows"
alternative would throw away accepted work). Finished rows keep running at a frozen position (their
outputs are ignored) so shapes stay static.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from dyndepth.config import is_whole
from dyndepth.core.accounting import accounting
from dyndepth.core.cache import KVCache
from dyndepth.devices import resolve_dtype
from dyndepth.generation import check_finite, filtered_probs

CACHE_MODES = ("shared", "separate")


@dataclass
class SpecStats:
    """Counts over one `speculative_generate` call (rows summed; the prefill is not counted as a verify)."""

    accepted: int = 0  # drafted tokens the verifier accepted (unfinished rows only, up to each row's last token)
    drafted: int = 0  # drafted tokens, unfinished rows only, none past a row's stop token or max_new_tokens
    draft_forwards: int = 0  # batched draft forward calls
    verify_forwards: int = 0  # batched full-compute verification calls, prefill excluded
    new_tokens: int = 0  # tokens emitted, summed over rows
    draft_tokens: int = 0  # token positions fed to draft forwards (all rows), prefill excluded
    verify_tokens: int = 0  # token positions fed to verifications (all rows), prefill excluded
    draft_flops: float = 0.0  # FLOPs that ran in draft forwards (GateSkip accounting + lm_head)
    verify_flops: float = 0.0  # FLOPs of verifications
    prefill_flops: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


def greedy_accept(logits_BKV: torch.Tensor, draft_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifier logits (B, K+1, V) over [cur, d1..dK]: accepted count n (B,) and the verifier's token at n."""
    y_BK = logits_BKV.argmax(-1)  # (B, K+1)
    n_B = (draft_BK == y_BK[:, :-1]).long().cumprod(1).sum(1)  # (B,) longest agreeing prefix
    return n_B, y_BK.gather(1, n_B[:, None]).squeeze(1)


def speculative_accept(p_BKV: torch.Tensor, q_BKV: torch.Tensor, draft_BK: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) per row.

    p (B, K+1, V): target probabilities after [cur, d1..dK]; q (B, K, V): the draft's, from which dK
    were sampled. Accept d_j with probability min(1, p_j(d_j) / q_j(d_j)) until the first rejection,
    then draw the next token from norm(max(0, p - q)) at that index (or from p_K when all K pass).
    Each emitted token is then distributed exactly as under p. Returns n (B,) and the drawn token (B,).
    """
    B, K = draft_BK.shape
    V = p_BKV.shape[-1]
    p_d = p_BKV[:, :K].gather(2, draft_BK[..., None]).squeeze(-1)  # (B, K)
    q_d = q_BKV.gather(2, draft_BK[..., None]).squeeze(-1)  # (B, K)
    u = torch.rand((B, K), generator=generator, device=p_BKV.device)
    n_B = (u * q_d < p_d).long().cumprod(1).sum(1)  # (B,) u < p/q without dividing
    q_pad = torch.cat([q_BKV, q_BKV.new_zeros(B, 1, V)], dim=1)  # (B, K+1, V): q = 0 after dK
    idx = n_B[:, None, None].expand(B, 1, V)
    p_n, q_n = p_BKV.gather(1, idx).squeeze(1), q_pad.gather(1, idx).squeeze(1)  # (B, V)
    resid = (p_n - q_n).clamp(min=0)
    total = resid.sum(-1, keepdim=True)
    resid = torch.where(total > 0, resid / total.clamp(min=1e-30), p_n)  # total 0 only when p == q
    return n_B, torch.multinomial(resid, 1, generator=generator).squeeze(1)


def _skip_method(model, draft_budget: float):
    from dyndepth.models.qwen3 import CausalLM

    method = getattr(model, "method", None)
    if not isinstance(model, CausalLM):  # (attach_gateskip, the fix named below, refuses it)
        raise ValueError(f"speculative_generate drafts with GateSkip's skip budget, and GateSkip attaches to the "
                         f"decoder family (CausalLM); a {type(model).__name__} cannot carry it: decode with `generate`.")
    if method is not None and "budget" not in method.knobs():  # (attach_gateskip refuses a model with a method)
        raise ValueError(f"speculative_generate drafts at a skip budget, and the attached {method.name} method has "
                         f"none (its knobs: {sorted(method.knobs())}); draft with GateSkip: attach it to the base model, "
                         f"without {method.name}.")
    if method is None:
        raise ValueError("speculative_generate needs a model with a skipping method attached "
                         "(e.g. dyndepth.methods.attach_gateskip) to draft with.")
    with method.decoding(budget=draft_budget):  # raises the method's own "run calibrate(...)" error if needed
        pass
    return method


def _forward_flops(out) -> torch.Tensor:
    """FLOPs that ran in one forward (the ledger's executed total, lm_head included)."""
    return out.stats["flops/executed"]


@dataclass
class _Options:
    max_new_tokens: int
    draft_budget: float
    num_draft: int
    cache_mode: str
    stops: torch.Tensor  # (S,) stop token ids
    sample: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # logits (B, V) -> token, q


class _Run:
    """The state of one speculative_generate call; every tensor is per row."""

    def __init__(self, model, method, input_ids: torch.Tensor, mask: torch.Tensor, opt: _Options,
                 cache_dtype: torch.dtype | str | None) -> None:
        self.model, self.method, self.opt = model, method, opt
        B, device = input_ids.shape[0], input_ids.device
        lengths = mask.sum(-1)  # (B,)
        self.prompt_len = int(lengths.max())  # the longest prompt: positions 0..prompt_len-1, whatever the padding
        # every position a step may write: a step drafts at most the tokens still to come (fewer than max_new_tokens)
        self.size = self.prompt_len + opt.max_new_tokens + min(opt.num_draft, opt.max_new_tokens)
        dtype = resolve_dtype(cache_dtype) or next(model.parameters()).dtype  # (a dtype or its name)

        def make() -> KVCache:
            return KVCache.for_model(model.config, B, self.size, num_slots=model.num_slots(), dtype=dtype,
                                     device=device)

        self.cache = make()
        self.draft_cache = self.cache if opt.cache_mode == "shared" else make()
        self.pos = lengths.clone()  # (B,) position of `cur`, the last emitted token
        self.prev = input_ids[:, -1].clone()  # (B,) the token at pos - 1 (left padding: last prompt token)
        self.count = torch.zeros(B, dtype=torch.long, device=device)  # tokens emitted per row
        self.unfinished = torch.ones(B, dtype=torch.bool, device=device)
        self.stats = SpecStats()
        self.flops = {"draft": 0.0, "verify": 0.0, "prefill": 0.0}

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Write the prompt to the cache(s); return the first new token (B,), from the full model."""
        model, seen = self.model, self.prompt_len  # readers see the longest prompt (PAD columns write nothing)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        with self.method.decoding(budget=0.0):
            out = model(input_ids, attention_mask=mask, positions=positions, cache=self.cache.window(seen),
                        num_logits=1)
        self.flops["prefill"] = _forward_flops(out)
        check_finite(out.logits, model, "the prompt's next-token logits")
        if self.opt.cache_mode == "separate":
            with self.method.decoding(budget=self.opt.draft_budget):
                d = model(input_ids, attention_mask=mask, positions=positions,
                          cache=self.draft_cache.window(seen), num_logits=1)
            self.flops["prefill"] = self.flops["prefill"] + _forward_flops(d)
        return self.opt.sample(out.logits[:, -1])[0]

    def window(self, k: int) -> int:
        """Cache columns readers need this step: up to the last position written (pos + k)."""
        return min(self.size, int(self.pos.max()) + k + 1)

    def draft(self, cur_B: torch.Tensor, k: int, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k draft tokens (B, k) and, when sampling, the draft's probabilities for them (B, k, V)."""
        tok, pos = cur_B[:, None], self.pos[:, None]  # (B, 1)
        if self.opt.cache_mode == "separate":  # catch up on the token at pos - 1 (module docstring)
            tok = torch.stack([self.prev, cur_B], 1)  # (B, 2)
            pos = torch.stack([self.pos - 1, self.pos], 1)  # (B, 2)
        drafts, probs = [], []
        if self.opt.cache_mode == "separate":  # drop the draft's entries of rejected tokens (sparse slots)
            self.draft_cache.invalidate(self.pos - 1)
        cache = self.draft_cache.window(window)
        with self.method.decoding(budget=self.opt.draft_budget):
            for _ in range(k):
                out = self.model(tok, positions=pos, cache=cache, num_logits=1)
                self.flops["draft"] = self.flops["draft"] + _forward_flops(out)
                self.stats.draft_forwards += 1
                self.stats.draft_tokens += tok.numel()
                d_B, q_BV = self.opt.sample(out.logits[:, -1])
                drafts.append(d_B)
                probs.append(q_BV)
                tok, pos = d_B[:, None], pos[:, -1:] + 1  # (B, 1)
        d_BK = torch.stack(drafts, 1) if drafts else cur_B.new_zeros(len(cur_B), 0)  # (B, k)
        q_BKV = torch.stack(probs, 1) if drafts and probs[0] is not None else None  # (B, k, V)
        return d_BK, q_BKV

    def verify(self, block_BK: torch.Tensor, window: int) -> torch.Tensor:
        """Full-compute logits (B, K+1, V) over [cur, d1..dK] at pos..pos+K, written to the main cache."""
        B, K1 = block_BK.shape
        pos_BK = self.pos[:, None] + torch.arange(K1, device=block_BK.device)  # (B, K+1)
        self.cache.invalidate(self.pos)  # nothing at or after pos may survive from drafts or rejected tokens
        with self.method.decoding(budget=0.0):
            out = self.model(block_BK, positions=pos_BK, cache=self.cache.window(window))
        self.flops["verify"] = self.flops["verify"] + _forward_flops(out)
        self.stats.verify_forwards += 1
        self.stats.verify_tokens += block_BK.numel()
        return out.logits

    def emit(self, block_BK: torch.Tensor, n_B: torch.Tensor, nxt_B: torch.Tensor,
             out_BN: torch.Tensor) -> torch.Tensor:
        """Record d1..dn and nxt per unfinished row (cut after a stop token or at max_new_tokens) into
        out (B, max_new_tokens), advance the rows, and return the new `cur` (B,)."""
        B, K1 = block_BK.shape
        ar = torch.arange(K1, device=block_BK.device)
        e_BK = torch.cat([block_BK[:, 1:], block_BK[:, :1]], 1)  # (B, K+1): d1..dK, then a placeholder
        e_BK = e_BK.scatter(1, n_B[:, None], nxt_B[:, None])  # d1..dn, nxt
        m_B = n_B + 1  # tokens this row emits
        stopped = torch.zeros_like(self.unfinished)
        if len(self.opt.stops):
            is_stop = torch.isin(e_BK, self.opt.stops) & (ar < m_B[:, None])  # (B, K+1)
            stopped = is_stop.any(1)
            m_B = torch.where(stopped, is_stop.long().argmax(1) + 1, m_B)
        m_B = torch.minimum(m_B, self.opt.max_new_tokens - self.count)
        m_B = torch.where(self.unfinished, m_B, 0)  # finished rows stay frozen
        write = ar < m_B[:, None]  # (B, K+1)
        rows = torch.arange(B, device=block_BK.device)[:, None].expand(B, K1)
        out_BN[rows[write], (self.count[:, None] + ar)[write]] = e_BK[write]
        reach_B = torch.where(stopped, m_B, self.opt.max_new_tokens - self.count)  # (B,) output tokens from pos on
        live = self.unfinished  # drafts past a row's stop token or its last token are no output: not counted
        self.stats.accepted += int(torch.minimum(n_B, m_B)[live].sum())
        self.stats.drafted += int(reach_B.clamp(max=K1 - 1)[live].sum())
        self.count += m_B
        self.unfinished &= ~stopped & (self.count < self.opt.max_new_tokens)
        self.prev = torch.where(m_B > 0, block_BK.gather(1, n_B[:, None]).squeeze(1), self.prev)
        self.pos = self.pos + m_B
        return e_BK.gather(1, (m_B - 1).clamp(min=0)[:, None]).squeeze(1)


def _prepare(model, input_ids: torch.Tensor, attention_mask, max_new_tokens: int, num_draft: int,
             cache_mode: str, stop_tokens, pad_token_id, temperature, top_k, top_p):
    """Check the arguments (generate's checks, and this loop's own); return the long mask (B, T), stop ids (S,) and
    the pad id."""
    from dyndepth.generation import check_request

    if not is_whole(num_draft) or num_draft < 1:
        raise ValueError(f"num_draft must be a whole number >= 1, got {num_draft!r}.")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r} is not one of {CACHE_MODES}.")
    return check_request(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p, stop_tokens,
                         pad_token_id)


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    draft_budget: float = 0.5,
    num_draft: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cache_mode: str = "shared",
    cache_dtype: torch.dtype | str | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Self-speculative decoding: the prompt plus up to `max_new_tokens` tokens (B, T + n), and SpecStats.

    The model drafts `num_draft` tokens under `method.decoding(draft_budget)` (thresholds calibrated with
    `calibrate(model, batches, draft_budget)`) and verifies them in one full-compute forward.
    temperature 0: the output equals `generate(model, ...)` at full compute (budget 0), token for token, in float32. In
    bfloat16 / float16 the verifier's block forward rounds its activations differently from generate's one-token steps
    (its logits move by a rounding unit or two), so where two tokens tie or nearly tie the pick can go the other way
    (both are greedy picks; from there the texts differ).
    temperature > 0 (optionally top_k / top_p): every token is distributed as in full-compute sampling
    with the same settings (speculative sampling); the random stream differs from `generate`'s.
    Other arguments as in `dyndepth.generation.generate`; `cache_mode` ("shared" | "separate") is
    explained in the module docstring. Unlike `generate`, its forwards keep their FLOP ledger (SpecStats reports
    the FLOPs drafts and verifications ran), whatever `core.accounting` says outside.
    """
    method = _skip_method(model, draft_budget)
    mask, stops, pad = _prepare(model, input_ids, attention_mask, max_new_tokens, num_draft, cache_mode,
                                stop_tokens, pad_token_id, temperature, top_k, top_p)
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens == 0:
        return input_ids, SpecStats()
    sampling = temperature > 0

    def sample(logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not sampling:
            return logits_BV.argmax(-1), None
        q_BV = filtered_probs(logits_BV, temperature, top_k, top_p)
        return torch.multinomial(q_BV, 1, generator=generator).squeeze(1), q_BV

    with accounting(True):  # SpecStats sums what each forward executed: its forwards keep their ledger
        run = _Run(model, method, input_ids, mask,
                   _Options(max_new_tokens, draft_budget, num_draft, cache_mode, stops, sample), cache_dtype)
        cur_B = run.prefill(input_ids, mask)
        out_BN = torch.full((len(input_ids), max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        out_BN[:, 0] = cur_B
        run.count += 1
        run.unfinished &= (run.count < max_new_tokens) & ~torch.isin(cur_B, stops)
        while bool(run.unfinished.any()):
            need = int((max_new_tokens - run.count)[run.unfinished].max())
            k = min(num_draft, need - 1)  # a step emits up to k + 1 tokens: never draft past the end
            window = run.window(k)
            d_BK, q_BKV = run.draft(cur_B, k, window)
            block_BK = torch.cat([cur_B[:, None], d_BK], 1)  # (B, K+1)
            logits_BKV = run.verify(block_BK, window)
            # (a NaN the prompt did not have, e.g. a float16 overflow later in the text, was emitted as token 0; the
            # loop reads the device each step anyway)
            check_finite(logits_BKV[run.unfinished], model, "the full model's logits of a decode step (the prompt's "
                                                            "were finite)")
            if sampling:
                p_BKV = filtered_probs(logits_BKV, temperature, top_k, top_p)
                if q_BKV is None:  # k == 0
                    q_BKV = p_BKV.new_zeros(len(p_BKV), 0, p_BKV.shape[-1])
                n_B, nxt_B = speculative_accept(p_BKV, q_BKV, d_BK, generator)
            else:
                n_B, nxt_B = greedy_accept(logits_BKV, d_BK)
            cur_B = run.emit(block_BK, n_B, nxt_B, out_BN)
        stats = run.stats
        stats.new_tokens = int(run.count.sum())
        stats.draft_flops, stats.verify_flops, stats.prefill_flops = (
            float(run.flops[name]) for name in ("draft", "verify", "prefill"))
        return torch.cat([input_ids, out_BN[:, :int(run.count.max())]], 1), stats
