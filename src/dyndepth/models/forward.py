"""The forward every model family shares: build the context, run the layer-application schedule, add the
logits, and collect losses, statistics and the compute ledger. A model provides `schedule`, `model`
(`embed_tokens`, `layers`, `norm`, `rotary_emb`), `lm_head`, `config`, `method` and `finish(ctx, head_ideal)`
(its own losses and statistics after the layers: MoE balancing, flops/dense, Dreamer's depth metrics), and
`init_state(ctx)` when it keeps per-forward state of its own (`ctx.model_state`, e.g. Dreamer's depth memory).

Shape legend: B batch, T tokens, D hidden_size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dyndepth.config import position_limit, position_limit_name
from dyndepth.core import flops
from dyndepth.core.accounting import ComputeLedger
from dyndepth.core.cache import KVCache
from dyndepth.core.context import ForwardContext, causal_mask


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V), or (B, num_logits, V)
    aux_loss: torch.Tensor  # scalar, already weighted; zero when there is none
    stats: dict = field(default_factory=dict)  # detached scalars for logging (flops/*, tokens/*, <method>/*)
    compute: ComputeLedger | None = None  # executed and ideal FLOPs per (slot, part) of this forward


@dataclass(frozen=True)
class Application:
    """One step of a model's schedule: apply `model.layers[layer]` with KV-cache slot `slot` at recurrence
    step `step` (0 for a plain decoder; depth-recurrent models apply one layer at steps 0..R-1). `grad=False`
    runs it without gradients (truncated backprop through depth: the first steps of a training forward)."""

    layer: int
    slot: int
    step: int = 0
    grad: bool = True


@dataclass
class Trace:
    """Pass `trace=Trace()` to a forward to keep what it computed: the residual stream after the embedding
    and after each layer application (`streams`, when `keep_streams`), and the forward's context (`ctx`:
    the method's state, the ledger, positions and validity). Analysis tools read this instead of
    re-running the layer loop."""

    keep_streams: bool = False
    streams: list = field(default_factory=list)
    ctx: ForwardContext | None = None


def make_context(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None, cache: KVCache | None,
                 doc_ids: torch.Tensor | None = None) -> ForwardContext:
    """Positions (left padding: real tokens count from 0), rotary tables, the attention mask and the method."""
    B, T = input_ids.shape
    valid = None if attention_mask is None else attention_mask.bool()
    given_positions = positions is not None
    if positions is None:
        if cache is not None:
            raise ValueError("positions are required with a KV cache: the caller owns positions.")
        if valid is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        else:  # left padding: real tokens count from 0, as HF generate does
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    dtype = model.model.embed_tokens.weight.dtype
    if torch.is_autocast_enabled(input_ids.device.type):
        dtype = torch.get_autocast_dtype(input_ids.device.type)

    def rope(pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.model.rotary_emb(pos_BT, dtype)  # (B, T, H) each

    cos, sin = rope(positions)
    attn_mask = None  # None: SDPA's causal fast path, exact when positions are 0..T-1 with no padding
    if cache is None:
        if valid is not None or doc_ids is not None or (given_positions and not _is_arange(positions)):
            attn_mask = causal_mask(positions, positions, valid, valid, doc_ids)  # (B, 1, T, T)
    elif doc_ids is not None:
        raise ValueError("doc_ids (intra-document masking) is for cache-free training forwards.")
    # A cached forward decodes whatever the module mode (a sample generated mid-training): no training routing,
    # losses or controller statistics, as the recurrent families' cached forwards already were.
    ctx = ForwardContext(positions, valid, cos, sin, attn_mask, cache, doc_ids,
                         training=model.training and cache is None, rope=rope, method=model.method)
    ctx.ordered = not given_positions  # derived positions increase along every row's valid tokens
    return ctx


def run_schedule(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, cache: KVCache | None = None, num_logits: int | None = None,
                 doc_ids: torch.Tensor | None = None, trace: Trace | None = None) -> DecoderOutput:
    """embed -> x = layers[a.layer](x, ctx, a.slot) for each application a of `model.schedule` -> norm -> lm_head."""
    if not torch.compiler.is_compiling():  # the public boundary: bad input fails here, in one clear line
        check_inputs(model.config, input_ids, attention_mask, positions, cache, doc_ids, num_logits)
        check_cache(model, cache, input_ids.shape[0])
    ctx = model.make_context(input_ids, attention_mask, positions, cache, doc_ids)
    ctx.model_state = model.init_state(ctx)
    x = model.model.embed_tokens(input_ids)  # (B, T, D)
    if trace is not None and trace.keep_streams:
        trace.streams.append(x)
    method = model.method
    if method is not None:
        ctx.state = method.begin(input_ids, ctx)
    for app in model.schedule:
        layer = model.model.layers[app.layer]
        if app.grad:
            x = layer(x, ctx, app.slot)  # (B, T, D)
        else:  # truncated backprop: an early recurrence step of a training forward
            with torch.no_grad():
                x = layer(x, ctx, app.slot)
        ctx.ledger.flush()  # the call's FLOPs into the tables (so a compiled layer sees the same state every call)
        if trace is not None and trace.keep_streams:
            trace.streams.append(x)
    if num_logits is not None:
        x = x[:, -num_logits:]
    logits = model.lm_head(model.model.norm(x))  # (B, T, V)
    head_valid = x.shape[0] * x.shape[1] if ctx.valid is None else ctx.valid[:, -x.shape[1]:].sum()
    head = flops.lm_head_flops(model.config)
    ctx.ledger.add(-1, "lm_head", executed=x.shape[0] * x.shape[1] * head, ideal=head_valid * head)
    losses, stats = model.finish(ctx, head_valid * head)
    if method is not None:
        result = method.end(ctx)
        losses += result.losses
        stats.update(result.stats)
    if ctx.ledger.enabled:
        stats.update({"flops/executed": ctx.ledger.total_tensor("executed"),
                      "flops/ideal": ctx.ledger.total_tensor("ideal"), "tokens/valid": ctx.valid_or_all.sum()})
    ctx.ledger.close()  # what backward recomputes (activation checkpointing) is not this forward's work
    if trace is not None:
        trace.ctx = ctx
    aux_loss = logits.new_zeros((), dtype=torch.float32) + sum(losses)
    return DecoderOutput(logits, aux_loss, stats, ctx.ledger)


def dense_flops_stat(ctx: ForwardContext, config, per_token, applications: int, head_ideal) -> dict:
    """{"flops/dense": what the plain model needs for this forward's tokens}: every valid token through `applications`
    layer applications of `per_token` matmul FLOPs, the causal keys each one sees, and the logits computed
    (`head_ideal`); {} in a forward without a ledger (`core.accounting.accounting(False)`, as `generate` runs)."""
    if not ctx.ledger.enabled:
        return {}
    valid = ctx.valid_or_all
    pairs = (valid * (ctx.positions + 1)).sum()  # causal keys each valid token sees
    dense = valid.sum() * per_token + applications * flops.attn_score_flops(config, pairs) + head_ideal
    return {"flops/dense": dense.double()}


def check_inputs(config, input_ids, attention_mask=None, positions=None, cache=None, doc_ids=None,
                 num_logits=None) -> None:
    """ValueError naming the problem and the fix for inputs the model cannot run (one host read: the id range, and
    with explicit positions their largest)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of token ids (batch, time), got "
                         f"{type(input_ids).__name__}.")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}; add a batch dimension "
                         "with input_ids[None] for one sequence.")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what the embedding takes
        raise ValueError(f"input_ids must hold integer token ids as int64 (or int32), got dtype {input_ids.dtype}; "
                         "use .long().")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {(B, T)}); pass at least one token per row.")
    if positions is not None and isinstance(positions, torch.Tensor) and positions.numel():
        ends = torch.stack([*torch.aminmax(input_ids.long()), positions.max().long()])  # (3,) one read
        lo, hi, top = (int(v) for v in ends)
    else:
        (lo, hi), top = (int(v) for v in torch.aminmax(input_ids)), None
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}) (the model's vocab_size), got ids from {lo} "
                         f"to {hi}; use the model's own tokenizer, or a model with a larger vocabulary.")
    for name, t in (("attention_mask", attention_mask), ("positions", positions), ("doc_ids", doc_ids)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (batch, time), got {type(t).__name__}.")
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {tuple(t.shape)}.")
    if attention_mask is not None and attention_mask.dtype.is_floating_point:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 1 for real tokens and 0 for padding; got other values.")
    limit = position_limit(config)  # (YaRN's extended length where it is longer)
    if positions is None and T > limit:  # with a mask, positions count each row's real tokens: the longest row counts
        longest = T if attention_mask is None else int(attention_mask.bool().sum(-1).max())  # (left padding past it)
        if longest > limit:
            raise ValueError(f"the input has {longest} tokens, more than {position_limit_name(config)}; shorten "
                             "it, or use a model configured for longer inputs.")
    if positions is not None and cache is None and top >= limit:
        raise ValueError(f"positions reach {top}, beyond {position_limit_name(config)}.")
    if cache is not None and top is not None and top >= cache.length:  # (a write at column S, the scratch one, was
        # lost without a word, and one past it an IndexError)
        raise ValueError(f"positions reach {top}, but the KV cache holds positions 0..{cache.length - 1}; make one "
                         f"with max_seq_len > {top} (KVCache.for_model(model.config, batch_size, max_seq_len, ...)).")
    if num_logits is not None and not 0 < num_logits <= T:
        raise ValueError(f"num_logits must lie in [1, {T}] (the input length), got {num_logits}.")


def check_cache(model, cache: KVCache | None, batch_size: int) -> None:
    """ValueError when a KV cache cannot hold this forward: too few slots (one per layer application, plus a
    method's: a depth-recurrent model run with more `steps` than the cache was made for), another batch size, or
    another dtype than the forward computes in (outside autocast, which casts what attention reads), or one made under
    torch.inference_mode used outside it."""
    if cache is None:
        return
    cache.check_writable()
    make = ("KVCache.for_model(model.config, batch_size, max_seq_len, num_slots=model.num_slots(), "
            "dtype=next(model.parameters()).dtype)")
    if len(cache.keys) < model.num_slots():
        raise ValueError(f"the KV cache has {len(cache.keys)} slots but this forward writes {model.num_slots()} (one "
                         f"per layer application, and a method's extra ones); make it with {make} under the knobs "
                         "(steps) the forwards run with.")
    dtype, device = model.model.embed_tokens.weight.dtype, cache.keys[0].device.type
    if cache.keys[0].dtype != dtype and not torch.is_autocast_enabled(device):
        raise ValueError(f"the KV cache holds {cache.keys[0].dtype} but the model computes in {dtype}; make it with "
                         f"{make}, or run under torch.autocast.")
    if cache.batch_size != batch_size:
        raise ValueError(f"the KV cache holds {cache.batch_size} rows but input_ids has {batch_size}; make a cache "
                         "for this batch size (or take cache.rows(...) of it).")


def _is_arange(positions: torch.Tensor) -> bool:
    """True when positions are 0..T-1 in every row (so SDPA's causal fast path is exact)."""
    T = positions.shape[1]
    return bool((positions == torch.arange(T, device=positions.device)).all())
