"""Dynamic Nested Depth (DND, Chen et al. 2025, arXiv:2510.11001): in a band of middle layers, tokens a router
scores as hard run the same layer a second time, and the two outputs are mixed.

Shape legend: B batch, T tokens, D hidden_size, K selected tokens per row (padded to the longest row).

Per DND layer i, with layer input x (spec: ../shared/papers/dnd.md):
    x^v = block_i(x)                                   # vanilla pass, every token
    p = sigmoid(R(x^v))                                # (B, T) router, Linear(D -> 1), float32
    m = p > tau_i                                      # token choice: each token decides alone
    x^d = block_i(Pack(x^v, m))                        # nested pass: the selected tokens only, same weights
    x = (beta_i p) x^d + (1 - beta_i p) x^v            # selected tokens; the others keep x^v
The nested pass runs the layer's own branches and norms (what `block` runs) on a sub-context of the selected
tokens (`ctx.subset`): they attend causally to each other only, never across rows or documents. Rows are
padded to the longest row's count; queries, o_proj and the MLP run on the selected tokens only. With
`positions="compact"` (the paper's "new positional encodings") a selected token's position is the number of
selected tokens before it in its sequence (document); `"original"` keeps its position id. MoE layers re-route
nested tokens through their experts, and the balancing loss counts them (the sub-context shares `ctx.aux`).

Training adds the router controlling loss, per sequence (document) and DND layer, PAD excluded:
score dispersion L_sd = -H(q) / log n with q = p / sum p (the paper's sign maximises the entropy;
`sd_sign="minimize_entropy"` flips it) and distribution preservation L_dp = mean (p - 0.5)^2, each averaged
over sequences and layers and weighted by `sd_weight` / `dp_weight`. The threshold tau (a float32 buffer
per layer, in the checkpoint, frozen at inference) is set by `DNDHook`, no gradients: every step
tau += alpha (actual - target ratio); every `sync_every` steps tau moves by gamma toward the threshold that
selects the target ratio of a buffer of recent scores (`ema_target`), the ranks' buffers pooled.

KV cache: the vanilla pass keeps the layer's slot; the nested pass of the j-th DND layer has its own slot
`len(model.schedule) + j` (`extra_slots`), holding K/V of the selected tokens only, at column = compact
position (`KVCache.count` gives the next one while decoding) or original position. Entries remember the
tokens' real positions (`cache_source`), so `KVCache.invalidate` drops stale nested entries too. While
decoding, only the rows that selected a token run the nested pass (`ctx.rows`), and it reads the nested slot
only up to its last compact column. With `nested_attends_vanilla` it reads the layer's slot as well
(`ForwardContext.also_reading`: one softmax over both).

Our choices where the paper is silent (docs/methods.md): a router bias (zero init), one tau and one beta
(shape (1,): FSDP2 cannot shard scalars) per layer, the nested pass reads x^v, strict `p > tau` (with the
zero-initialised router nothing is selected until the controller lowers tau below 0.5, one step),
ratio statistics over all non-PAD tokens. `ratio=1.0` runs every token twice (the compute-matched upper
bound; tau is not used). Ablations: `control="topk"` (no threshold control: per-sequence top-k in
training, per document with doc_ids, MoR's expert choice; tau tracks the top-k threshold by EMA for causal
inference), `"fixed"` (tau never moves); `nested_attends_vanilla=True` (TaH-style: nested queries also see
the layer's vanilla K/V, with original positions; without a cache recomputed from the layer input, with one
read from the layer's own slot, where the vanilla pass wrote them).
"""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from dyndepth.config import check_fields
from dyndepth.core.accounting import sum_entries
from dyndepth.core.context import ForwardContext
from dyndepth.core.layers import apply_keeping_float32, linear_float32
from dyndepth.core.method import MethodOutput, check_knobs
from dyndepth.core.routing import (
    SelectRule,
    capacity,
    gather_padded,
    pack_indices,
    rank_threshold,
    scatter_padded_add,
    select,
    threshold_between,
)
from dyndepth.methods.common import (
    check_attachable,
    check_structural,
    make_config,
    method_dict,
    override_knobs,
)

POSITIONS = ("compact", "original")
CONTROLS = ("threshold", "topk", "fixed")
EMA_TARGETS = ("quantile", "topk_mean")
SD_SIGNS = ("maximize_entropy", "minimize_entropy")
STRUCTURAL = ("router_bias",)  # fields that shape parameters: fixed once attached (and `layers`, as the band)


@dataclass
class DNDConfig:
    layers: tuple[int, int] = (4, -5)  # inclusive band (first, last); negative counts from the end
    ratio: float = 0.2  # k_target: the fraction of tokens the controller steers each layer to select
    beta_init: float = 0.1
    tau_init: float = 0.5
    router_bias: bool = True  # ours (the paper: a plain linear layer); zero init
    router_init_std: float = 0.0  # 0: zero init (paper); > 0 selects tokens from step 0
    positions: str = "compact"  # nested-pass positions: compact (paper's reading) | original
    nested_attends_vanilla: bool = False  # TaH-style ablation: nested queries see vanilla K/V too (original pos.)
    sd_sign: str = "maximize_entropy"  # the paper's L_sd = -H(q); "minimize_entropy" flips it
    sd_weight: float = 1e-2  # lambda_sd (0 with dp_weight 0: no router controlling loss)
    dp_weight: float = 1e-2  # lambda_dp
    control: str = "threshold"  # threshold (paper) | topk (no threshold control) | fixed (tau never moves)
    alpha: float = 1e-2  # proportional step
    gamma: float = 0.5  # EMA weight of the buffer's target threshold
    sync_every: int = 50  # T_sync
    ema_target: str = "quantile"  # quantile (the k-th largest score) | topk_mean (mean of the top k)
    buffer_batches: int = 50  # N_b: recent training forwards whose scores the buffer keeps
    buffer_tokens: int = 20_000  # scores kept per forward and layer (strided subsample)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (list, tuple)) or not all(isinstance(i, numbers.Integral) and
                                                                 not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"dnd.layers={self.layers!r} must be an inclusive band of two layer indices (first, "
                             "last), e.g. (4, 23); a single layer i is (i, i).")
        if len(self.layers) != 2:
            raise ValueError(f"dnd.layers={tuple(self.layers)} must be an inclusive band (first, last), e.g. (4, 23).")
        checks = (("positions", POSITIONS), ("control", CONTROLS), ("ema_target", EMA_TARGETS),
                  ("sd_sign", SD_SIGNS))
        for name, allowed in checks:  # (before the type checks: `--set method.control=none` reads None)
            if getattr(self, name) not in allowed:
                raise ValueError(f"dnd.{name}={getattr(self, name)!r} is not one of {allowed}.")
        check_fields(self, "dnd", ValueError)
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"dnd.ratio={self.ratio} must lie in (0, 1]: the fraction of tokens nested (0.2 for 20%); "
                             "for the plain fine-tune without nesting, set method.name = \"none\".")
        if self.sync_every < 1 or self.buffer_batches < 1 or self.buffer_tokens < 1:
            raise ValueError("dnd.sync_every, dnd.buffer_batches and dnd.buffer_tokens must be >= 1.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"dnd.gamma={self.gamma} must lie in [0, 1]: the EMA pull toward the buffer's target.")
        if not 0.0 <= self.tau_init <= 1.0:
            raise ValueError(f"dnd.tau_init={self.tau_init} must lie in [0, 1] (a threshold on sigmoid scores).")
        for name in ("alpha", "sd_weight", "dp_weight", "router_init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"dnd.{name}={getattr(self, name)} must be >= 0.")
        if self.nested_attends_vanilla and self.positions != "original":
            raise ValueError("dnd.nested_attends_vanilla=True mixes vanilla and nested keys by position; "
                             "set dnd.positions='original'.")

    def band(self, num_layers: int) -> list[int]:
        first, last = (i + num_layers if i < 0 else i for i in self.layers)
        if not 0 <= first <= last < num_layers:
            raise ValueError(f"dnd.layers={self.layers} selects no band of a {num_layers}-layer model; give "
                             f"(first, last) with 0 <= first <= last < {num_layers}, e.g. ({min(1, num_layers - 1)}, "
                             f"{max(min(1, num_layers - 1), num_layers - 2)}) "
                             "(in a recipe: --set 'method.layers=[first,last]').")
        return list(range(first, last + 1))


class LayerDND(nn.Module):
    """What DND adds to a layer: `model.layers.{i}.dnd.router` (Linear(D -> 1)), `.beta` (1,) and the buffer
    `.tau` (the selection threshold; float32 whatever the model's dtype)."""

    def __init__(self, dim: int, cfg: DNDConfig) -> None:
        super().__init__()
        self.router = nn.Linear(dim, 1, bias=cfg.router_bias)
        if cfg.router_init_std:
            nn.init.normal_(self.router.weight, std=cfg.router_init_std)
        else:
            nn.init.zeros_(self.router.weight)
        if self.router.bias is not None:
            nn.init.zeros_(self.router.bias)
        self.beta = nn.Parameter(torch.full((1,), cfg.beta_init))
        self.register_buffer("tau", torch.full((), cfg.tau_init))

    float32_buffers = ("tau",)
    _apply = apply_keeping_float32


@dataclass
class DNDState:
    """One forward's routing, read by `end`, the analysis tools (via `Trace`) and the tests."""

    valid: torch.Tensor  # (B, T) non-PAD tokens
    topk: bool  # training forward with control="topk": per-sequence (document) top-k instead of the threshold
    padded: bool = True  # some tokens are PAD (False: valid is all True and needs no masking)
    n_valid: torch.Tensor | int = 0  # valid tokens: a count on the host when nothing is padded (no op per layer)
    cached: bool = False  # a forward through a KV cache (generation): the FLOP-overhead statistics are skipped
    scores: dict = field(default_factory=dict)  # slot -> p (B, T) float32, detached
    keep: dict = field(default_factory=dict)  # slot -> selected (B, T) bool
    sd: list = field(default_factory=list)  # per-layer router losses (training)
    dp: list = field(default_factory=list)
    beta: list = field(default_factory=list)  # per-layer beta, read inside the layer call (FSDP2 unshards there)


class DND:
    """The method (see the module docstring). Attach with `attach_dnd`; runtime knobs: nested, tau_offset."""

    name = "dnd"

    def __init__(self, config: DNDConfig, layers: list[int], num_applications: int) -> None:
        self.layers, self.num_layers = list(layers), num_applications  # (one application per layer)
        self.nested_slot = {layer: num_applications + j for j, layer in enumerate(self.layers)}
        self.scores_buffer = {layer: deque(maxlen=config.buffer_batches) for layer in self.layers}
        self._decoder = None
        self.configure(config)

    def configure(self, config: DNDConfig) -> None:
        """Adopt a new config (training options); runtime knobs reset."""
        check_structural(self.name, getattr(self, "config", None), config, STRUCTURAL)
        if hasattr(self, "config") and config.band(self.num_layers) != self.layers:  # (0, -1) and (0, 1) can agree
            raise ValueError(f"dnd.layers cannot change once attached (it shapes the parameters): the method runs on "
                             f"layers {self.layers[0]}-{self.layers[-1]}, dnd.layers={config.layers} selects "
                             f"{config.band(self.num_layers)[0]}-{config.band(self.num_layers)[-1]}.")
        self.config = config
        self.nested, self.tau_offset = True, 0.0
        for layer in self.layers:
            self.scores_buffer[layer] = deque(self.scores_buffer[layer], maxlen=config.buffer_batches)

    def extra_slots(self, num_slots: int) -> int:
        return len(self.layers)

    # ---- runtime knobs ----
    def knobs(self) -> dict:
        return {"nested": self.nested, "tau_offset": self.tau_offset}

    def _check(self, knobs: dict) -> None:
        check_knobs(self.name, ("nested", "tau_offset"), knobs)

    def override(self, **knobs):
        """`with method.override(nested=False)`: vanilla passes only; `tau_offset` shifts every threshold."""
        return override_knobs(self, self._check, **knobs)

    def decoding(self, **knobs):
        """Cached decoding needs nothing: tau is trained, frozen at inference, and token choice is causal."""
        return self.override(**knobs)

    def recording(self, recorder):
        raise ValueError("DND has no calibration: its thresholds tau are set during training by the threshold "
                         "controller (DNDHook) and saved with the weights; use method.override(tau_offset=...) "
                         "to nest more or fewer tokens.")

    def set_thresholds(self, thresholds: dict, knobs: dict) -> None:
        self.recording(None)

    def trainer_hooks(self, total_steps: int) -> list:
        return [DNDHook(self, total_steps)]

    def lookahead(self) -> str:
        return ""  # each token against tau (control="topk" ranks only in training forwards)

    def untrained_parameters(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return method_dict(self.name, self.config)

    def bind(self, model) -> None:
        self._decoder = model.model

    @property
    def layer_dnd(self) -> list[LayerDND]:
        """Each DND layer's parameters and tau, in band order."""
        return [self._decoder.layers[i].dnd for i in self.layers]

    # ---- per forward ----
    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> DNDState:
        valid = ctx.valid_or_all
        if ctx.cache is not None:  # the nested slots hold the selected tokens only
            ctx.cache.rewrite_from(ctx.positions, ctx.valid, list(self.nested_slot.values()))
        return DNDState(valid=valid, topk=ctx.training and self.config.control == "topk", padded=ctx.valid is not None,
                        n_valid=valid.numel() if ctx.valid is None else valid.sum(), cached=ctx.cache is not None)

    def end(self, ctx: ForwardContext) -> MethodOutput:
        st: DNDState = ctx.state
        out = MethodOutput()
        if not st.keep:
            return out
        if ctx.ledger.enabled or ctx.training:  # (no ledger in `generate`: see core.accounting; the controller
            n_valid = st.n_valid.clamp(min=1) if torch.is_tensor(st.n_valid) else max(st.n_valid, 1)  # reads these)
            counts = torch.stack(list(st.keep.values())).sum((1, 2))  # (L,) keep: valid tokens only
            fractions = counts / n_valid
            for slot, fraction in zip(st.keep, fractions.unbind()):
                out.stats[f"dnd/selected/L{slot}"] = fraction
            if ctx.training:  # the controller's ratio: the step's counts (a mean of per-forward ratios weighs
                for slot, count in zip(st.keep, counts.unbind()):  # micro-batches of unequal fill alike)
                    out.stats[f"dnd/nested_tokens/L{slot}"] = count
                out.stats["dnd/valid_tokens"] = st.n_valid
            out.stats["dnd/selected"] = fractions.mean()
            if ctx.ledger.enabled and not st.cached:  # a cached step is op-bound (out.compute keeps the FLOPs)
                out.stats["dnd/flops"], out.stats["dnd/flops_overhead"] = self._overhead(ctx.ledger.executed)
                out.stats["dnd/flops_overhead_ideal"] = self._overhead(ctx.ledger.ideal)[1]
        if st.sd:
            sd, dp = torch.stack(st.sd).mean(), torch.stack(st.dp).mean()
            out.stats["dnd/sd_loss"], out.stats["dnd/dp_loss"] = sd.detach(), dp.detach()
            out.losses += [w * v for w, v in ((self.config.sd_weight, sd), (self.config.dp_weight, dp)) if w]
        if ctx.training:
            out.stats["dnd/beta"] = torch.stack(st.beta).mean()
            for slot, p in st.scores.items():  # not NaN scores (a NaN forward, whose step nonfinite="skip" drops:
                finite = p[st.valid & p.isfinite()]  # ranked first, they made tau NaN for good)
                self.record_scores(slot, finite, p.numel())
        return out

    def _overhead(self, table: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(FLOPs of the nested passes and routers, their ratio to everything else: the plain model's work)."""
        nested = set(self.nested_slot.values())
        extra, base = [], []
        for (slot, part), v in table.items():
            (extra if slot in nested or part == "router" else base).append(v)
        extra, base = sum_entries(extra), sum_entries(base)
        return extra, (extra / base).float()

    def record_scores(self, layer: int, scores: torch.Tensor, size: int = 0) -> None:
        """Keep a strided subsample of one forward's scores (1-D) for the controller's buffer (none: nothing).
        `size`: the forward's B * T. The stride follows it, not the count of real tokens, so every forward of a shape
        keeps the same share of its tokens (the buffer's quantile weighs them alike, however padded)."""
        if scores.numel() == 0:  # (every score non-finite: the buffer's older forwards stay)
            return
        stride = max(1, -(-max(size, scores.numel()) // self.config.buffer_tokens))
        self.scores_buffer[layer].append(scores.detach().float()[::stride].contiguous())  # the subsample alone

    # ---- per layer ----
    def layer_forward(self, layer, x: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        xv = layer.block(x, ctx, slot)  # (B, T, D) vanilla pass
        if slot not in self.nested_slot:
            return xv
        st: DNDState = ctx.state
        p_BT = self._score(layer.dnd, xv, ctx, slot)  # (B, T) float32
        keep_BT = self._select(layer.dnd, p_BT, st, ctx.doc_ids)
        if not self.nested:  # override(nested=False): nothing nests, and the statistics say so
            keep_BT = torch.zeros_like(keep_BT)
        st.scores[slot], st.keep[slot] = _detached(p_BT), keep_BT
        if ctx.training:
            sd, dp = router_losses(p_BT, st.valid, ctx.doc_ids, self.config.sd_sign)
            st.sd.append(sd)
            st.dp.append(dp)
            st.beta.append(layer.dnd.beta.detach().float().reshape(()).clone())  # FSDP2 frees the unsharded copy
        if self.nested and ctx.traced_decode:
            return self._decode_step(layer, xv, p_BT, ctx, slot, keep_B1=keep_BT)  # one graph: every row runs it
        if self.nested and ctx.cache is not None:  # decoding: only the rows that selected a token run the pass
            rows_M = keep_BT.any(1).nonzero().squeeze(1)  # (M,) one host sync
            if rows_M.numel() == 0:
                return xv
            every = rows_M.numel() == x.shape[0]
            sub = ctx if every else ctx.rows(rows_M)

            def pick(t_B: torch.Tensor) -> torch.Tensor:
                return t_B if every else t_B.index_select(0, rows_M)

            if x.shape[1] == 1:  # one token per row (a decode step): packing is the identity
                out_MTD = self._decode_step(layer, pick(xv), pick(p_BT), sub, slot)
            else:
                out_MTD = self._fused(layer, pick(x), pick(xv), pick(p_BT), pick(keep_BT), sub, slot)
            return out_MTD if every else xv.index_copy(0, rows_M, out_MTD)  # (B, T, D)
        return self._fused(layer, x, xv, p_BT, keep_BT, ctx, slot)

    def _fused(self, layer, x, xv, p_BT, keep_BT, ctx: ForwardContext, slot: int) -> torch.Tensor:
        """x^v with the nested pass mixed in for the selected tokens: (B, T, D)."""
        idx_BK, valid_BK = pack_indices(keep_BT, size=None if self.nested else 0)  # (no host sync when off)
        if idx_BK.shape[1] == 0:  # nothing nested (in training: beta and router stay in the graph for DDP)
            return xv + 0.0 * (layer.dnd.beta * p_BT.sum()).to(xv.dtype) if ctx.training else xv
        xs_BKD = gather_padded(xv, idx_BK)  # (B, K, D)
        xd_BKD = self._nested_pass(layer, x, xs_BKD, keep_BT, idx_BK, valid_BK, ctx, slot)
        return scatter_padded_add(xv, self._mix(layer, gather_padded(p_BT, idx_BK), xs_BKD, xd_BKD), idx_BK, valid_BK)

    def _decode_step(self, layer, xv_M1D, p_M1, ctx: ForwardContext, slot: int,
                     keep_B1: torch.Tensor | None = None) -> torch.Tensor:
        """`_fused` for rows that all selected their one token (a decode step): they run the layer's block once
        more at the nested slot, as a decode step of their own, without the general path's packing (a third fewer
        ops: a decode step is launch-bound on a GPU and op-bound on a CPU). (M, 1, D)

        With `keep_B1` (a decode step torch.compile traces, CUDA graphs on a GPU): every row of the batch runs the
        block, one graph whatever the router decides and no host sync; the rows that selected nothing write their
        nested K/V to the cache's scratch column (they are not valid there) and keep x^v."""
        nslot = self.nested_slot[slot]
        nested = ctx
        if self.config.nested_attends_vanilla:  # original positions; the layer's vanilla K/V are in its own slot
            nested = ctx.also_reading(slot)
        elif self.config.positions == "compact":  # after the row's selected tokens already cached
            pos_M1 = ctx.cache.count(nslot)[:, None]
            cos, sin = ctx.rope(pos_M1)
            cache = ctx.cache  # a traced step keeps the static length; eager ones stop where compact columns end
            if keep_B1 is None:
                cache = cache.window(min(ctx.cache.length, int(pos_M1.max()) + 1))
            nested = ForwardContext(pos_M1, None, cos, sin, cache=cache, training=ctx.training, rope=ctx.rope,
                                    ledger=ctx.ledger, aux=ctx.aux, model_state=ctx.model_state,
                                    cache_source=ctx.positions)
        if keep_B1 is not None:
            nested = nested.copy()
            nested.valid = keep_B1  # writes: the selected rows only (keep is already False on PAD)
        xd_M1D = layer.block(xv_M1D, nested, nslot)
        mix = self._mix(layer, p_M1, xv_M1D, xd_M1D)
        return xv_M1D + (mix if keep_B1 is None else torch.where(keep_B1[..., None], mix, 0.0))

    @staticmethod
    def _mix(layer, p: torch.Tensor, xs: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
        """The fusion's update of the selected tokens: (beta p) (x^d - x^v), so x^v + it = (beta p) x^d +
        (1 - beta p) x^v. p (..., ) float32, xs / xd (..., D)."""
        w = layer.dnd.beta.float() * p  # fusion weight beta * p
        return w[..., None].to(xs.dtype) * (xd - xs)

    def _score(self, dnd: LayerDND, xv: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        """p = sigmoid(R(x^v)) in float32 (B, T), the router's FLOPs recorded as part "router"."""
        B, T, D = xv.shape
        r = linear_float32(dnd.router, xv)  # (B, T, 1)
        if ctx.ledger.enabled:
            n_valid = ctx.state.n_valid
            ctx.ledger.add(slot, "router", executed=B * T * 2 * D, ideal=n_valid * 2 * D, tokens=n_valid)
        return torch.sigmoid(r.squeeze(-1))

    def _select(self, dnd: LayerDND, p_BT: torch.Tensor, st: DNDState,
                doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Selected tokens (B, T): p > tau (token choice), every token at ratio 1, or top-k (control="topk") per
        sequence (per document with doc_ids, so a packed document selects what it would alone)."""
        if self.config.ratio >= 1.0:
            return st.valid.clone()
        if st.topk:
            if doc_ids_BT is not None:
                return topk_per_document(p_BT.detach(), st.valid, doc_ids_BT, self.config.ratio)
            return select(p_BT.detach(), st.valid, SelectRule(kind="topk", fraction=self.config.ratio))
        keep = _detached(p_BT) > (dnd.tau + self.tau_offset if self.tau_offset else dnd.tau)
        return keep & st.valid if st.padded else keep

    def _nested_pass(self, layer, x, xs_BKD, keep_BT, idx_BK, valid_BK, ctx: ForwardContext, slot: int):
        """x^d (B, K, D): the selected tokens through the same layer again (its own branches and norms), at the
        layer's nested cache slot. Rows are padded to the longest row's count K; the padding costs attention pairs
        only: the projections and the MLP run on the selected tokens, and without a cache the causal kernel skips
        the pairs above the diagonal."""
        nslot = self.nested_slot[slot]
        if self.config.nested_attends_vanilla:
            sub = ctx.subset(idx_BK, valid_BK, entries=True)
            if ctx.cache is None:
                a_BKD = self._attend_with_vanilla_kv(layer, x, xs_BKD, sub, valid_BK, ctx, nslot)
            else:  # the vanilla pass has just written every token's K/V to the layer's slot: read them there
                a_BKD = layer.attn_branch(layer.input_layernorm(xs_BKD), sub.also_reading(slot), nslot)
        else:
            pos_BK = None
            if self.config.positions == "compact":
                pos_BT = compact_positions(keep_BT, ctx.doc_ids)  # (B, T) rank among the row's selected tokens
                if ctx.cache is not None:
                    pos_BT = pos_BT + ctx.cache.count(nslot)[:, None]  # after the selected tokens already cached
                pos_BK = pos_BT.gather(1, idx_BK)
            sub = ctx.subset(idx_BK, valid_BK, positions_BK=pos_BK, entries=True)
            if ctx.cache is not None and pos_BK is not None:  # compact columns end far before the sequence does
                sub.cache = ctx.cache.window(min(ctx.cache.length, int(pos_BK.max()) + 1))
            a_BKD = layer.attn_branch(layer.input_layernorm(xs_BKD), sub, nslot)  # the padding neither projects
        h_BKD = xs_BKD + a_BKD  # nor queries (`sub.entries`)
        if sub.entries is None:  # no padding: every entry is a selected token
            return h_BKD + layer.mlp_branch(layer.post_attention_layernorm(h_BKD), sub, nslot, valid=valid_BK)
        rows_N, cols_N = sub.entries  # (N,) the selected tokens, flat
        h_ND = h_BKD[rows_N, cols_N]
        y_ND = layer.mlp_branch(layer.post_attention_layernorm(h_ND), sub, nslot,
                                valid=torch.ones_like(rows_N, dtype=torch.bool))
        return h_BKD.index_put((rows_N, cols_N), h_ND + y_ND)  # padding entries are never read

    @staticmethod
    def _attend_with_vanilla_kv(layer, x, xs_BKD, sub: ForwardContext, valid_BK, ctx: ForwardContext, nslot: int):
        """TaH-style nested attention (B, K, D): queries from the selected tokens; keys from their nested inputs and
        from every token's vanilla-pass input (recomputed: T extra K/V projections), causal by original position."""
        B, T, _ = x.shape
        both = ForwardContext(torch.cat([ctx.positions, sub.positions], 1), torch.cat([ctx.valid_or_all, valid_BK], 1),
                              torch.cat([ctx.cos, sub.cos], 1), torch.cat([ctx.sin, sub.sin], 1),
                              doc_ids=None if ctx.doc_ids is None else torch.cat([ctx.doc_ids, sub.doc_ids], 1),
                              training=ctx.training, rope=ctx.rope, ledger=ctx.ledger, aux=ctx.aux,
                              model_state=ctx.model_state)  # (B, T + K) keys: vanilla inputs, then nested
        h = torch.cat([layer.input_layernorm(x), layer.input_layernorm(xs_BKD)], 1)  # (B, T + K, D)
        q_idx_BK = T + torch.arange(xs_BKD.shape[1], device=x.device).expand(B, -1)  # the nested queries
        return layer.attn_branch(h, both, nslot, q_idx_BK=q_idx_BK, q_valid_BK=valid_BK)


def _detached(t: torch.Tensor) -> torch.Tensor:
    """t without its graph; t itself when it has none (inference: no op)."""
    return t.detach() if t.requires_grad else t


def compact_positions(keep_BT: torch.Tensor, doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) the number of selected tokens before each token in its row (its document, with doc_ids)."""
    k = keep_BT.long()
    before_BT = k.cumsum(1) - k
    if doc_ids_BT is not None:
        before_BT = before_BT - before_BT.gather(1, document_first(doc_ids_BT))
    return before_BT


def document_first(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) the column where each token's document starts in its row (a row starts a document)."""
    B, T = doc_ids_BT.shape
    start_BT = torch.ones(B, T, dtype=torch.long, device=doc_ids_BT.device)
    start_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    return (torch.arange(T, device=doc_ids_BT.device) * start_BT).cummax(1).values


def topk_per_document(p_BT: torch.Tensor, valid_BT: torch.Tensor, doc_ids_BT: torch.Tensor,
                      fraction: float) -> torch.Tensor:
    """`select`'s top-k rule (SelectRule(kind="topk")) with every document of every row as its own pool: keep
    k = ceil(fraction * n) of a document's n valid tokens, the highest scores, ties to the earlier token. (B, T)
    bool, no host sync. Flat over B*T: one stable sort by score, one by document (whose flat ranges ascend)."""
    B, T = p_BT.shape
    N = B * T
    arange_N = torch.arange(N, device=p_BT.device)
    rows_B1 = torch.arange(B, device=p_BT.device)[:, None] * T
    first_N = (rows_B1 + document_first(doc_ids_BT)).reshape(N)  # flat index of each token's document start
    valid_N = valid_BT.reshape(N)
    by_score_N = torch.argsort(p_BT.reshape(N).masked_fill(~valid_N, float("-inf")), descending=True, stable=True)
    order_N = by_score_N[torch.argsort(first_N[by_score_N], stable=True)]  # by document, then score (ties: earlier)
    rank_N = torch.empty_like(order_N).scatter_(0, order_N, arange_N) - first_N  # rank within the document
    n_N = torch.zeros(N, dtype=torch.float64, device=p_BT.device).index_add_(0, first_N, valid_N.double())
    k_N = (fraction * n_N[first_N] - 1e-6).ceil().clamp(min=0)  # the rule of `capacity`, as in `select`
    return ((rank_N < k_N) & valid_N).reshape(B, T)


def router_losses(p_BT: torch.Tensor, valid_BT: torch.Tensor, doc_ids_BT: torch.Tensor | None,
                  sd_sign: str = "maximize_entropy") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sd, L_dp) of one layer, each a mean over sequences (documents with doc_ids) of non-PAD tokens.

    L_sd = -H(q) / log n (sign: `sd_sign`), q = p / sum p over the sequence's n tokens (sequences with n >= 2);
    L_dp = mean (p - 0.5)^2."""
    B, T = p_BT.shape
    seg_BT = torch.arange(B, device=p_BT.device)[:, None] * T  # (B, 1) -> (B, T) one id per sequence
    if doc_ids_BT is not None:
        seg_BT = seg_BT + torch.cat([torch.zeros_like(doc_ids_BT[:, :1]),
                                     (doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]).long().cumsum(1)], 1)
    seg_BT = seg_BT.expand(B, T).reshape(-1)
    v = valid_BT.reshape(-1).float()
    p = p_BT.reshape(-1) * v

    def per_seq(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(B * T, dtype=values.dtype, device=values.device).index_add(0, seg_BT, values)

    n_S, total_S = per_seq(v), per_seq(p)
    q = p / total_S[seg_BT].clamp(min=1e-12)
    ent_S = -per_seq(torch.where(v > 0, q * torch.log(q.clamp(min=1e-12)), torch.zeros_like(q)))
    multi = n_S >= 2
    h = (ent_S[multi] / torch.log(n_S[multi])).mean() if bool(multi.any()) else p.sum() * 0
    sd = -h if sd_sign == "maximize_entropy" else h
    dp_S = per_seq((p_BT.reshape(-1) - 0.5).pow(2) * v) / n_S.clamp(min=1)
    has_S = n_S > 0
    dp = (dp_S * has_S).sum() / has_S.sum().clamp(min=1)  # mean over sequences with tokens (all PAD: 0, not nan)
    return sd, dp


def attach_dnd(model, cfg: DNDConfig | dict | None = None) -> DND:
    """Add a router, beta and tau to every layer of the band and make every layer call go through DND."""
    cfg = make_config(DNDConfig, cfg)
    layers = check_attachable(model, "dnd")
    band = cfg.band(len(layers))
    schedule = model.schedule
    if any(app.slot != app.layer for app in schedule) or len(schedule) != len(layers):
        raise ValueError(f"dnd runs each layer once per forward with slot = layer; {type(model).__name__}'s "
                         "schedule applies layers otherwise (depth recurrence).")
    ref = model.model.embed_tokens.weight  # (the lm_head may be a QuantLinear, which has no .weight)
    for i in band:
        layers[i].dnd = LayerDND(model.config.hidden_size, cfg).to(device=ref.device, dtype=ref.dtype)
    method = DND(cfg, band, len(schedule))
    method.bind(model)
    model.method = method
    return method


def _mean_over_ranks(dist, t: torch.Tensor) -> torch.Tensor:
    return t if dist is None else dist.all_reduce_mean(t)


def _pooled_targets(method: DND, dist) -> torch.Tensor | None:
    """`DNDHook.targets` over the buffered scores of every rank together, without gathering them (a buffer can
    hold hundreds of MB per rank): order statistics by bisection (`_kth_smallest`), counts and sums all-reduced.
    The same numbers as one process sorting the pooled scores; every rank gets them. (L,) float32, or None."""
    cfg, device = method.config, method.layer_dnd[0].tau.device
    scores = [torch.cat([t.to(device) for t in method.scores_buffer[layer]]) if method.scores_buffer[layer]
              else torch.zeros(0, device=device) for layer in method.layers]
    n = dist.all_reduce_sum(torch.tensor([float(s.numel()) for s in scores], dtype=torch.float64, device=device))
    if bool((n == 0).any()):  # (the same answer on every rank: the counts are all-reduced)
        return None
    if cfg.ema_target == "quantile":  # rank_threshold: midpoint of the k-th and (k+1)-th lowest, k = floor(q n)
        k = torch.floor((1.0 - cfg.ratio) * n + 1e-9)
        lo = _kth_smallest(scores, k.clamp(min=1), dist)
        hi = _kth_smallest(scores, torch.minimum(k + 1, n), dist)
        t = torch.where(k >= n, lo, threshold_between(lo, hi))
        return torch.where(k == 0, torch.full_like(t, float("-inf")), t).clamp(0.0, 1.0)
    m = torch.tensor([max(1, capacity(cfg.ratio, int(x))) for x in n.tolist()], dtype=torch.float64, device=device)
    t = _kth_smallest(scores, n - m + 1, dist)  # the m-th largest; topk_mean: the mean of the m largest
    above = torch.stack([torch.stack([(s > ti).sum().double(), s[s > ti].double().sum()]) for s, ti in zip(scores, t)])
    above = dist.all_reduce_sum(above)  # (L, 2): count and sum of the scores above it
    return ((above[:, 1] + (m - above[:, 0]) * t.double()) / m).float().clamp(0.0, 1.0)


def _kth_smallest(scores: list[torch.Tensor], rank: torch.Tensor, dist) -> torch.Tensor:
    """Per layer l, the rank[l]-th smallest (1-based) of scores[l] pooled over every rank: (L,) float32. Bisection over
    float32 bit patterns, which order as the values for finite scores >= 0 (sigmoids; the buffer keeps no NaN): 31
    halvings of [0, +inf], one all-reduce of L counts each."""
    bits = [s.float().contiguous().view(torch.int32) for s in scores]
    lo = torch.zeros(len(scores), dtype=torch.int64, device=rank.device)
    hi = torch.full_like(lo, 0x7F800000)  # +inf
    for _ in range(31):
        mid = (lo + hi) // 2
        count = dist.all_reduce_sum(torch.stack([(b <= m).sum() for b, m in zip(bits, mid)]).double())
        enough = count >= rank  # the rank-th smallest is <= mid
        lo, hi = torch.where(enough, lo, mid + 1), torch.where(enough, mid, hi)
    return lo.to(torch.int32).view(torch.float32)


class DNDHook:
    """Trainer hook: the threshold controller (no gradients). Every step tau += alpha (actual - target) per
    layer (control="threshold"); every `sync_every` steps tau += gamma (target threshold of the score buffer - tau)
    (threshold and topk). Under topk, where tau only serves inference, the run's last step also sets it to the
    target (a run shorter than `sync_every` saved tau_init and nested 2-3x the ratio at inference).
    The actual ratio is the step's selected / valid tokens over every micro-batch and data-parallel rank, and
    targets come from every rank's buffer pooled (exactly one process's target on the same rows), so every rank
    holds the same tau. tau lives in the layers' buffers (saved with the weights); the score buffer, this rank's
    recent scores, is saved in every rank's checkpoint state, so a resumed run syncs as the uninterrupted one does
    (at another world size, rank 0 takes every saved rank's scores)."""

    name = "dnd"  # logged metrics: dnd/tau/L{i}, dnd/ratio_error, dnd/selected/L{i} (the step's token ratio)

    def __init__(self, method: DND, total_steps: int) -> None:
        self.method, self.total_steps = method, total_steps

    def after_step(self, model, step: int, stats: dict, dist) -> dict:
        method, cfg = self.method, self.method.config
        taus = [d.tau for d in method.layer_dnd]
        actual = self.actual_ratios(stats, dist, taus[0].device)
        logged = {}  # the logged ratio is the controller's: the step's tokens (the stats' is a mean of micro-batches)
        if actual is not None:
            logged.update({f"selected/L{i}": float(a) for i, a in zip(method.layers, actual)})
            logged["selected"] = float(actual.mean())
        if cfg.ratio >= 1.0 or cfg.control == "fixed":
            return {**logged, **{f"tau/L{i}": float(t) for i, t in zip(method.layers, taus)}}
        if cfg.control == "threshold" and actual is not None:
            for tau, a in zip(taus, actual):
                tau.add_(cfg.alpha * (a - cfg.ratio)).clamp_(0.0, 1.0)
            logged["ratio_error"] = float((actual - cfg.ratio).abs().mean())
        self._sync(step, dist)
        logged.update({f"tau/L{i}": float(t) for i, t in zip(method.layers, taus)})
        return logged

    def after_skipped_step(self, model, step: int, dist) -> dict:
        """A step train.nonfinite="skip" dropped: no proportional step (its statistics are not finite), but the sync
        due at it runs on the buffer (finite scores only). Skipped, a sync step waited `sync_every` more steps, and
        under topk a skipped last step left tau at tau_init (inference nested 0.43 of the tokens for a 0.2 target)."""
        cfg = self.method.config
        if cfg.ratio >= 1.0 or cfg.control == "fixed":
            return {}
        self._sync(step, dist)
        return {f"tau/L{i}": float(d.tau) for i, d in zip(self.method.layers, self.method.layer_dnd)}

    def _sync(self, step: int, dist) -> None:
        """Every `sync_every` steps (and, under topk, at the run's last step: fully) tau moves toward the target."""
        cfg, taus = self.method.config, [d.tau for d in self.method.layer_dnd]
        last = step == self.total_steps and cfg.control == "topk"
        target = self.targets(dist) if step % cfg.sync_every == 0 or last else None
        if target is not None:
            for tau, t in zip(taus, target.to(taus[0].device)):
                tau.lerp_(t, 1.0 if last else cfg.gamma).clamp_(0.0, 1.0)

    def actual_ratios(self, stats: dict, dist, device) -> torch.Tensor | None:
        """(L,) the step's selected / valid tokens per DND layer, over every micro-batch and rank; None when the
        step's statistics hold no selection (a step of the training forward has them, ledger or not)."""
        layers = self.method.layers
        keys = [f"dnd/selected/L{i}" for i in layers]
        counts = [f"dnd/nested_tokens/L{i}" for i in layers] + ["dnd/valid_tokens"]
        if all(k in stats for k in counts):  # the step's selected / valid tokens, every micro-batch and rank
            n = _mean_over_ranks(dist, self._stack(stats, counts, device))  # (L + 1,) means of counts
            return n[:-1] / n[-1].clamp(min=1e-9)  # (means of the same micro-batches: a ratio of sums)
        if all(k in stats for k in keys):  # (statistics of one forward, as the tests hand them)
            return _mean_over_ranks(dist, self._stack(stats, keys, device))
        return None

    @staticmethod
    def _stack(stats: dict, keys: list[str], device) -> torch.Tensor:
        return torch.stack([torch.as_tensor(stats[k], dtype=torch.float32) for k in keys]).to(device)

    def targets(self, dist=None) -> torch.Tensor | None:
        """Per layer (float32): the threshold that selects the target ratio of the buffered scores; None while a
        layer has none. Under DDP / FSDP2 the scores of every rank are pooled (`_pooled_targets`), so the ranks
        set the threshold one process holding all their rows would (a mean of per-rank quantiles is not that)."""
        if dist is not None and dist.distributed:
            return _pooled_targets(self.method, dist)
        if not all(self.method.scores_buffer[layer] for layer in self.method.layers):
            return None
        cfg, out = self.method.config, []
        for layer in self.method.layers:
            s = torch.cat(list(self.method.scores_buffer[layer]))
            if cfg.ema_target == "quantile":  # midpoint of the k-th and (k+1)-th largest: selects exactly k
                t = rank_threshold(s[None], None, 1.0 - cfg.ratio, scope="batch").reshape(())
            else:
                t = s.topk(max(1, capacity(cfg.ratio, s.numel()))).values.mean()
            out.append(t.clamp(0.0, 1.0))
        return torch.stack(out).float()

    def state_dict(self) -> dict:
        return {"scores": {layer: list(self.method.scores_buffer[layer]) for layer in self.method.layers}}

    def merge_rank_states(self, states: list[dict]) -> dict:
        """Resumed at another world size: this rank's buffer from the saved ranks' `states` it takes over (rank 0:
        all, the others: none), so that the pooled buffer `targets` reads is the saved one. The k-th newest forward
        of every saved rank become one entry, which ages out of the buffer as those forwards would have."""
        merged = {}
        for layer in self.method.layers:
            per_rank = [list(s.get("scores", {}).get(layer, [])) for s in states]
            n = max(map(len, per_rank), default=0)
            merged[layer] = [torch.cat([f[len(f) - n + i] for f in per_rank if len(f) - n + i >= 0])
                             for i in range(n)]
        return {"scores": merged}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("scores", {})  # checkpoints before 2026-12-04 kept no buffer: it refills in sync_every
        device = self.method.layer_dnd[0].tau.device  # checkpoints load on the CPU; new scores join on the model's
        for layer in self.method.layers:
            self.method.scores_buffer[layer].clear()
            self.method.scores_buffer[layer].extend(t.to(device) for t in saved.get(layer, []))
