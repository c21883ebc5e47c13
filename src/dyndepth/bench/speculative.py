"""Self-speculative GateSkip decoding against plain `generate`: wall-clock timed interleaved in one run, next to
acceptance and the FLOP and forward-count ideals (`methods/speculative.py` is the decoding itself)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from dyndepth.bench.timing import interleaved_median
from dyndepth.core.accounting import accounting
from dyndepth.methods.speculative import SpecStats, speculative_generate


def _one_prompt(model, ids: torch.Tensor, max_new_tokens: int, spec_kwargs: dict, repeats: int,
               warmup: int) -> tuple[dict, SpecStats, float, bool]:
    """Interleaved timings, stats, plain decoding's FLOPs and output equality for one (1, T) prompt."""
    def plain() -> torch.Tensor:  # with its FLOP ledger, as speculative decoding keeps one (like against like)
        with accounting(True):
            return model.generate(ids, max_new_tokens, stop_tokens=[], skip_budget=0.0)

    def spec() -> tuple[torch.Tensor, SpecStats]:
        return speculative_generate(model, ids, max_new_tokens, stop_tokens=[], **spec_kwargs)

    times = interleaved_median({"generate_s": plain, "speculative_s": spec}, ids.device, repeats, warmup)
    ran = []  # plain decoding's FLOPs: what each forward of `generate` executed (its cached prefill included)
    hook = model.register_forward_hook(lambda module, args, out: ran.append(out.compute.total("executed")))
    try:
        ref = plain()
    finally:
        hook.remove()
    out, stats = spec()
    return times, stats, sum(ran), torch.equal(out, ref)


def benchmark_speculative(model, prompts: Sequence[torch.Tensor], max_new_tokens: int = 32,
                          draft_budget: float = 0.5, num_draft: int = 4, cache_mode: str = "shared",
                          repeats: int = 5, warmup: int = 2) -> dict:
    """Greedy decoding of each prompt alone (B = 1, the latency setting): wall-clock of speculative vs
    plain full-compute `generate`, timed interleaved in this run (both keeping their FLOP ledgers: speculative
    decoding reports its FLOPs), with acceptance and two ideal speedups:
    - flops_speedup = FLOPs of plain decoding / FLOPs of speculative decoding (usually < 1: drafting and
      verifying rejected drafts cost extra FLOPs; speculation buys fewer sequential forwards instead);
    - forward_bound_speedup = (n - 1) / (verify_forwards + draft_forwards * f), f = the draft's FLOPs
      per token over the verifier's: the speedup if a forward cost its per-token compute whatever its
      width (memory-bound decoding at small batch).
    Stop tokens are off, so both sides produce exactly `max_new_tokens` tokens.
    """
    if max_new_tokens < 2:  # the prefill emits the first token: with one, nothing is drafted or verified
        raise ValueError(f"benchmark_speculative max_new_tokens must be >= 2 (speculation drafts and verifies the "
                         f"tokens after the first), got {max_new_tokens}.")
    if not prompts:  # nothing to time: the ratios divided 0 by 0
        raise ValueError("benchmark_speculative needs at least one prompt.")
    for i, prompt in enumerate(prompts):  # one sequence each: a (B, T) batch was flattened into one long prompt
        if prompt.dim() > 2 or (prompt.dim() == 2 and prompt.shape[0] != 1) or prompt.numel() == 0:
            raise ValueError(f"benchmark_speculative prompt {i} has shape {tuple(prompt.shape)}; each prompt is one "
                             "non-empty sequence of ids, (T,) or (1, T): pass a batch as a list of its rows.")
    device = next(model.parameters()).device
    kwargs = {"draft_budget": draft_budget, "num_draft": num_draft, "cache_mode": cache_mode}
    res = {"generate_s": 0.0, "speculative_s": 0.0}
    agg, dense, spent, cost, match = SpecStats(), 0.0, 0.0, 0.0, True
    for prompt in prompts:
        times, st, plain_flops, same = _one_prompt(model, prompt.reshape(1, -1).to(device), max_new_tokens,
                                                  kwargs, repeats, warmup)
        for name in res:
            res[name] += times[name]
        for field in dataclasses.fields(SpecStats):
            setattr(agg, field.name, getattr(agg, field.name) + getattr(st, field.name))
        dense += plain_flops
        spent += st.prefill_flops + st.draft_flops + st.verify_flops
        f = (st.draft_flops / max(st.draft_tokens, 1)) / (st.verify_flops / max(st.verify_tokens, 1))
        cost += st.verify_forwards + st.draft_forwards * f
        match &= same
    steps = len(prompts) * (max_new_tokens - 1)
    return {**res, "speedup": res["generate_s"] / res["speculative_s"], "flops_speedup": dense / spent,
            "forward_bound_speedup": steps / max(cost, 1e-9),
            "tokens_per_verify": (agg.new_tokens - len(prompts)) / max(agg.verify_forwards, 1),
            "outputs_match": bool(match), "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            **kwargs, **agg.to_dict()}
