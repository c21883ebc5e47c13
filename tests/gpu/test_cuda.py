"""What runs differently on a GPU, checked there: CUDA's SDPA kernels, grouped expert matmuls in bf16, bf16
weights and autocast, cached decoding of every method, training steps of every method.

Marked `gpu`, so `make test` deselects them; `scripts/device_check.sh` runs them on a lent GPU
(`python3 -m pytest -m gpu tests/gpu`). `DYNDEPTH_TEST_DEVICE=cpu` runs them on the CPU, which checks the
tests themselves (`DYNDEPTH_TEST_DEVICE=cpu pytest -m gpu tests/gpu`)."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.methods import DNDConfig, GateSkipConfig, attach_dnd, attach_gateskip, calibrate
from dyndepth.models.dreamer import DreamerConfig, DreamerLM
from dyndepth.models.hf_layout import config_to_hf
from dyndepth.models.moe import Experts
from dyndepth.train import run_training

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # the training tests' loader
from tiny_loader import TinyLoader  # noqa: E402

DEVICE = torch.device(os.environ.get("DYNDEPTH_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]
KINDS = ["plain", "moe", "gateskip", "dnd", "dreamer"]


def _spread(model, std: float) -> None:
    """Matrices redrawn at `std`, larger than the init, so every component moves the logits visibly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_tokens" not in name:
                p.normal_(0, std)


def build(kind: str) -> torch.nn.Module:
    """A tiny random model of `kind`, in eval mode on DEVICE (fp32)."""
    torch.manual_seed(0)
    if kind == "dreamer":
        model = DreamerLM(DreamerConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, num_recurrences=3, layers_per_group=2, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=128))
        _spread(model, 0.15)
        return model.to(DEVICE).eval()
    model = CausalLM(preset("tiny-qwen3-moe" if kind == "moe" else "tiny-qwen3"))
    if kind == "gateskip":
        method = attach_gateskip(model, GateSkipConfig(budget=0.0))
        with torch.no_grad():
            for layer in model.model.layers:
                for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                    gate.proj.weight.normal_(0, 0.5)
                    gate.proj.bias.zero_()
    if kind == "dnd":
        method = attach_dnd(model, DNDConfig(layers=(0, 1)))
        with torch.no_grad():
            for d in method.layer_dnd:
                d.router.weight.normal_(0, 1.0)  # p far from tau for most tokens: some select, some do not
                d.beta.fill_(0.5)
    return model.to(DEVICE).eval()


def left_padded(B: int = 3, T: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def prefill_then_decode(model, ids, mask, P: int) -> torch.Tensor:
    """Logits of a prefill of P columns and then one cached step per column, (B, T, V)."""
    B, T = ids.shape
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots(), device=DEVICE)
    steps = [model(ids[:, :P], attention_mask=mask[:, :P], positions=pos[:, :P], cache=cache).logits]
    for t in range(P, T):
        steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_the_full_forward_with_left_padding(kind):
    model = build(kind)
    ids, mask = left_padded()
    if kind == "gateskip":
        calibrate(model, [torch.randint(0, 256, (4, 24), device=DEVICE) for _ in range(2)], budget=0.3)
    decoding = model.method.decoding(budget=0.3) if kind == "gateskip" else torch.no_grad()
    trace = dyndepth.Trace()
    with decoding, torch.no_grad():
        full = model(ids, attention_mask=mask, trace=trace).logits
        got = prefill_then_decode(model, ids, mask, P=8)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], full[valid], atol=1e-4, rtol=1e-4)
    if kind in ("gateskip", "dnd"):  # the method decided something: some tokens routed, some not
        keeps = [k for k in trace.ctx.state.keep.values() if k is not None]
        assert keeps and any(bool((k & valid).any()) and bool((~k & valid).any()) for k in keeps)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_greedy_generation_runs_and_equals_its_own_uncached_argmax(kind):
    # bf16 changes the logits; cached and uncached bf16 runs must still pick the same tokens on a clear margin.
    model = build(kind).to(torch.bfloat16)
    if kind == "gateskip":
        calibrate(model, [torch.randint(0, 256, (4, 24), device=DEVICE)], budget=0.3)
    ids = torch.randint(0, 256, (2, 6), device=DEVICE)
    knobs = {"skip_budget": 0.3} if kind == "gateskip" else {}
    out = model.generate(ids, 5, stop_tokens=[], **knobs)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], ids)
    ctx = model.method.decoding(budget=0.3) if kind == "gateskip" else torch.no_grad()
    with ctx, torch.no_grad():
        logits = model(out[:, :-1]).logits[:, 5:].float()  # (B, 5, V): the steps that chose out[:, 6:]
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.25 * logits.std()  # near-ties may flip between bf16 kernels
    chosen = logits.argmax(-1)
    assert clear.any() and torch.equal(chosen[clear], out[:, 6:][clear])


@pytest.mark.parametrize("precision", ["bfloat16", "autocast"])
def test_gateskip_skips_exactly_the_budget_in_low_precision(precision):
    # fresh gates give ~0.993 to every token: in bf16 every score ties, yet exactly floor(q * n) must skip
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).eval()
    method = attach_gateskip(model, GateSkipConfig(budget=0.0))
    model.to(DEVICE)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (4, 40), device=DEVICE)
    for q in (0.2, 0.35):
        with method.override(budget=q), torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16,
                                                                          enabled=precision == "autocast"):
            stats = model(ids).stats
        for branch in ("attn", "mlp"):
            assert float(stats[f"gateskip/{branch}_skipped"]) == pytest.approx(math.floor(q * 160) / 160, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_expert_matmuls_equal_one_matmul_per_expert(dtype, monkeypatch):
    # On CUDA (compute capability 8.0+), bf16 takes torch's grouped matmul kernel; fp32 one matmul per expert.
    import torch.nn.functional as F

    calls = []
    if hasattr(F, "grouped_mm"):
        real = F.grouped_mm
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    grouped = Experts(8, 64, 32, grouped=True).to(DEVICE)
    loop = Experts(8, 64, 32, grouped=False).to(DEVICE)
    with torch.no_grad():
        grouped.gate_up_proj.normal_(0, 0.3)  # unit-scale outputs, so a tolerance means something
        grouped.down_proj.normal_(0, 0.3)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(96, 64, device=DEVICE)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(96)]).to(DEVICE)  # (N, K) distinct experts
    w = torch.rand(96, 2, device=DEVICE)
    outs, grads = [], []
    for experts in (grouped, loop):
        xi = x.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype, enabled=dtype == torch.bfloat16):
            y = experts(xi, idx, w)
        y.float().square().sum().backward()
        outs.append(y.float())
        grads.append([xi.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert outs[1].abs().mean() > 0.1  # the scale the relative check is taken at
    for a, b in zip([outs[0], *grads[0]], [outs[1], *grads[1]]):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < rel
    if DEVICE.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(DEVICE) >= (8, 0):
        assert calls  # the grouped kernel ran (forward and backward)


def test_decoder_equals_hf_transformers_on_the_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = dyndepth.ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=256)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(ours, torch.float32))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    ids, mask = left_padded()
    for dtype, tol in ((torch.float32, dict(atol=1e-4, rtol=1e-4)), (torch.bfloat16, dict(atol=0.1, rtol=0.05))):
        ref_model = hf.to(DEVICE, dtype).eval()
        model = dyndepth.from_pretrained(tmp_path, dtype=dtype, device=DEVICE).eval()
        with torch.no_grad():
            ref = ref_model(input_ids=ids, attention_mask=mask).logits.float()
            got = model(ids, attention_mask=mask).logits.float()
        valid = mask.bool()
        torch.testing.assert_close(got[valid], ref[valid], **tol)


RECIPES = {
    "dreamer": '[model]\ntype = "dreamer"\nvocab_size = 256\nhidden_size = 64\nnum_attention_heads = 4\n'
               'num_key_value_heads = 2\nnum_recurrences = 3\nnum_experts = 8\nnum_experts_per_tok = 2\n'
               'moe_intermediate_size = 32\nea_bias_update_rate = 0.01\n',
    "dnd": '[model]\npreset = "tiny-qwen3"\n[method]\nname = "dnd"\nlayers = [0, 1]\nratio = 0.2\n'
           'router_init_std = 0.02\n',
    "gateskip": '[model]\npreset = "tiny-qwen3"\n[method]\nname = "gateskip"\nbudget = 0.2\n',
}


@pytest.mark.parametrize("kind,compile", [("dreamer", False), ("dnd", False), ("gateskip", False),
                                          pytest.param("gateskip", True, id="gateskip_compiled")])
def test_bf16_training_lowers_the_loss(kind, compile, tmp_path):
    recipe = RECIPES[kind] + ('[train]\nbatch_size = 8\nseq_len = 32\nlog_every = 1\nwarmup = 2\nlr = 3e-3\n'
                              'min_lr = 3e-4\nprogress = false\nplot = false\n[eval]\nenabled = false\n')
    (tmp_path / "r.toml").write_text(recipe)
    result = run_training(tmp_path / "r.toml", [f"train.out_dir={tmp_path / 'run'}", "train.steps=30",
                                                f"train.device={DEVICE.type}", "train.dtype=bfloat16",
                                                f"train.compile={str(compile).lower()}"],
                          loader=TinyLoader(8, 32))
    losses = [loss for _, loss in result.losses]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
