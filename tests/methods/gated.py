"""A GateSkip model for tests (tiny, random, with gates spread so token importances clearly differ) and an
independent reference forward to check it against."""

import math

import torch

from dyndepth import CausalLM, preset
from dyndepth.methods import GateSkipConfig, attach_gateskip


def gated_model(name="tiny-qwen3", eos=None, vocab=None, layers=None, spread=True, max_positions=None, **cfg):
    torch.manual_seed(0)
    overrides = {"eos_token_id": eos}
    if max_positions is not None:
        overrides["max_position_embeddings"] = max_positions
    if vocab is not None:
        overrides["vocab_size"] = vocab
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    model = CausalLM(preset(name, **overrides)).eval()
    method = attach_gateskip(model, GateSkipConfig(**cfg))
    if spread:
        with torch.no_grad():
            shared = method.config.shared
            holders = [model.model.gateskip] if shared else [layer.gateskip for layer in model.model.layers]
            for gates in holders:
                for gate in (gates.attn_gate, gates.mlp_gate):
                    gate.proj.weight.normal_(0, 0.5)
                    gate.proj.bias.zero_()
    return model, method


def ref_keep(s_BT, pool_BT, q, scope):
    """Slow rank rule: per pool skip the floor(q * n) lowest scores, ties: the later token first."""
    B, T = s_BT.shape
    keep = pool_BT.clone()
    pools = [[(b, t) for b in range(B) for t in range(T)]] if scope == "batch" else \
        [[(b, t) for t in range(T)] for b in range(B)]
    for cells in pools:
        cells = [c for c in cells if pool_BT[c]]
        k = math.floor(q * len(cells) + 1e-9)
        for c in sorted(cells, key=lambda c: (float(s_BT[c]), -(c[0] * T + c[1])))[:k]:
            keep[c] = False
    return keep


def masked_dense_reference(model, ids, mask=None, eos=()):
    """The official masked path, written without the method: every branch runs densely for every token and
    the outputs of skipped tokens are zeroed; selection by the slow rank rule. Returns (logits, keeps,
    importances), the last two keyed by (slot, branch)."""
    q, scope = model.method.budget, model.method.config.scope
    ctx = model.make_context(ids, mask, None, None)
    ctx.method = None
    valid = ctx.valid_or_all
    pool = valid & ~torch.isin(ids, torch.tensor(list(eos), dtype=torch.long))
    x = model.model.embed_tokens(ids)
    keeps, scores = {}, {}
    for slot, layer in enumerate(model.model.layers):
        for branch, norm in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
            h = norm(x)
            gates = model.model.gateskip if model.method.config.shared else layer.gateskip
            g = getattr(gates, f"{branch}_gate")(h)
            y = layer.self_attn(h, ctx, slot) if branch == "attn" else layer.mlp(h)
            keep = ref_keep(g.mean(-1), pool, q, scope) | (valid & ~pool) if q > 0 else torch.ones_like(valid)
            keeps[(slot, branch)], scores[(slot, branch)] = keep, g.mean(-1)
            x = x + (g * keep[..., None]).to(x.dtype) * y
    return model.lm_head(model.model.norm(x)), keeps, scores
