"""Static layer pruning (GateSkip spec section 7): remove whole decoder layers by a score, GateSkip's mean gate
importance of the layer's two branches, or ShortGPT's block influence 1 - cos(h_in, h_out) (low = the layer
barely changes the residual stream). Pruning renumbers the layers, so HF names stay contiguous and a pruned
model (plain or GateSkip) round-trips through `save_pretrained` / `from_pretrained`; DND and MoD name their layers
by index, so they are attached after pruning. Dynamic whole-layer skipping (a token skips
attention and MLP together, by the attention gate) is GateSkip's `skip_unit="layer"`.

Shape legend: B batch, T tokens, L layers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import is_whole
from dyndepth.core.batch import split_batch
from dyndepth.methods.gateskip_analysis import collect_gate_stats, eval_mode, trace_forward
from dyndepth.models.moe import SparseMoE
from dyndepth.models.qwen3 import CausalLM

SCORES = ("gate", "influence")


@torch.no_grad()
def block_influence(model, batches) -> list[float]:
    """ShortGPT's block influence per layer: 1 - mean over valid tokens of cos(h_in, h_out), where h is the
    residual stream entering and leaving the layer (with the attached method, at its current budget)."""
    sums, count = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64), 0
    with eval_mode(model):
        for batch in batches:
            tr = trace_forward(model, *split_batch(batch), streams=True)
            for i, (h_in, h_out) in enumerate(zip(tr.streams[:-1], tr.streams[1:])):
                cos_BT = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
                sums[i] += float(cos_BT[tr.valid].double().sum())
            count += int(tr.valid.sum())
    if count == 0:
        raise ValueError("block_influence saw no valid tokens; pass a list of token id tensors (B, T).")
    return (1 - sums / count).tolist()


def layer_importance(model, batches, by: str = "gate") -> list[float]:
    """One score per decoder layer (low = prunable). "gate": mean GateSkip importance of the layer's attn
    and MLP branches over valid tokens; "influence": ShortGPT block influence (`block_influence`)."""
    if by not in SCORES:
        raise ValueError(f"by={by!r} is not one of {SCORES}.")
    if by == "influence":
        return block_influence(model, batches)
    name = getattr(getattr(model, "method", None), "name", None)
    if name != "gateskip":  # (the analysis's own error said to attach GateSkip: untrained gates score layers alike)
        raise ValueError(f"by='gate' scores layers by post-trained GateSkip gates, and the model carries "
                         f"{name or 'no method'}; score it by ShortGPT block influence instead: by='influence' (or "
                         "attach_gateskip and post-train the gates first: dyndepth train RECIPE --method gateskip).")
    return collect_gate_stats(model, batches).mean.mean(-1).tolist()


def remove_layers(model, indices: list[int]) -> None:
    """Delete decoder layers `indices` in place: renumber the rest, update `config.num_hidden_layers`, and
    for MoE rewrite `mlp_only_layers` (with `decoder_sparse_step=1`) so every layer keeps its kind."""
    L = len(model.model.layers)
    drop = set(indices)
    name = getattr(getattr(model, "method", None), "name", None)
    if name not in (None, "gateskip"):  # their configs name layers by index: a renumbered model broke or did not load
        raise ValueError(f"remove_layers renumbers the layers, and the attached {name} method names its layers by "
                         "index; prune the model before attaching it (GateSkip's per-layer gates move with their "
                         "layers).")
    if not drop <= set(range(L)) or len(drop) >= L:
        raise ValueError(f"cannot remove layers {sorted(indices)} from a {L}-layer model: give distinct "
                         f"indices in [0, {L}) and keep at least one layer.")
    old = list(model.model.layers)
    keep = [i for i in range(L) if i not in drop]
    model.model.layers = nn.ModuleList(old[i] for i in keep)
    fields = {"num_hidden_layers": len(keep)}
    if model.config.num_experts:
        fields["mlp_only_layers"] = [new for new, i in enumerate(keep) if not isinstance(old[i].mlp, SparseMoE)]
        fields["decoder_sparse_step"] = 1
    # a new config: models built from the same config object (it is not copied) keep theirs (editing it in place
    # made them save a config.json that no longer described their weights)
    model.config = dataclasses.replace(model.config, **fields)


def prune_layers(model, n: int, batches=None, by: str = "gate", scores: list[float] | None = None) -> list[int]:
    """Remove the `n` decoder layers with the lowest score in place; return their original indices.

    Scores come from `layer_importance(model, batches, by)` unless given (one float per layer). Ties go to
    the earlier layer.
    """
    if not isinstance(model, CausalLM):  # a recurrent family applies its layers many times (scores per application)
        raise ValueError(f"prune_layers removes layers of the decoder family (CausalLM: a layer per application); a "
                         f"{type(model).__name__} applies its layers repeatedly: run fewer recurrences instead "
                         "(its `steps` knob), where it has one.")
    L = len(model.model.layers)
    if not is_whole(n) or not 0 <= n < L:
        raise ValueError(f"n={n}: prune between 0 and {L - 1} of the model's {L} layers.")
    if scores is None:
        if batches is None:
            raise ValueError("prune_layers needs `batches` to score the layers, or precomputed `scores`.")
        scores = layer_importance(model, batches, by)
    scores = [float(v) for v in scores]  # (a tensor or numpy array too)
    if len(scores) != L:
        raise ValueError(f"got {len(scores)} scores for {L} layers.")
    bad = [i for i, v in enumerate(scores) if not math.isfinite(v)]
    if bad:  # NaN compares false with everything: the sort dropped arbitrary layers
        raise ValueError(f"layer {bad[0]} scored {scores[bad[0]]}: prune by finite scores only (NaN / inf come from "
                         "non-finite activations on the scoring batches; check the model and the batches).")
    removed = sorted(sorted(range(L), key=lambda i: (scores[i], i))[:n])
    if removed:
        remove_layers(model, removed)
    return removed
