"""The Huginn-style baseline (models/huginn.py): schedule and sandwich block, input injection, the recurrence sampler
and truncated backprop, cached generation, checkpoints, the trainer, and the FLOP count against torch's counter."""

import copy
import dataclasses

import families
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyndepth
from dyndepth import KVCache
from dyndepth.core.layers import apply_rope
from dyndepth.models.forward import run_schedule
from dyndepth.models.huginn import HuginnConfig, HuginnLM, sample_steps
from dyndepth.train import run_training
from dyndepth.train.parallel import apply_activation_checkpointing

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def tiny(**kw) -> HuginnConfig:
    fields = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2,
              "n_layers_in_coda": 1, "mean_recurrence": 3, "mean_backprop_depth": 1, "max_position_embeddings": 64}
    return HuginnConfig(**{**fields, **kw})


def varied(config, seed: int = 0) -> HuginnLM:
    return families.varied(HuginnLM, config, std=0.2, seed=seed)


def left_padded(B=3, T=10, vocab=256):
    return families.left_padded(B, T, vocab, pads=(0, 3, 6))


def test_schedule_loops_the_block_and_the_forward_matches_a_slow_reference():
    model = varied(tiny())
    assert [(a.layer, a.slot, a.step) for a in model.schedule] == [
        (0, 0, 0), (1, 1, 0), (2, 2, 0), (1, 3, 1), (2, 4, 1), (1, 5, 2), (2, 6, 2), (3, 7, 0)]
    assert model.num_slots() == model.config.num_hidden_layers == 8
    ids = torch.randint(0, 256, (2, 7))
    layers = model.model.layers

    def sandwich(layer, x):  # Huginn's block, written out with full causal attention
        h = layer.input_layernorm(x)
        B, T, _ = h.shape
        q = layer.self_attn.q_proj(h).view(B, T, 4, 8)
        k = layer.self_attn.k_proj(h).view(B, T, 2, 8).repeat_interleave(2, 2)
        v = layer.self_attn.v_proj(h).view(B, T, 2, 8).repeat_interleave(2, 2)
        cos, sin = model.model.rotary_emb(torch.arange(T)[None], x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = layer.post_attention_layernorm(x + layer.self_attn.o_proj(a.transpose(1, 2).reshape(B, T, 32)))
        return layer.post_feedforward_layernorm(x + layer.mlp(layer.pre_feedforward_layernorm(x)))

    with torch.no_grad():
        e = sandwich(layers[0], model.model.embed_tokens(ids))
        s = torch.zeros_like(e)
        for _ in range(3):
            s = layers[1].adapter(torch.cat([s, e], -1))
            s = sandwich(layers[2], sandwich(layers[1], s))
        x = sandwich(layers[3], layers[3].recurrent_norm(s))
        torch.testing.assert_close(model(ids).logits, model.lm_head(model.model.norm(x)), rtol=1e-5, atol=1e-5)


def test_the_sampler_draws_around_the_mean_and_backprops_through_the_last_steps_only():
    cfg = tiny(mean_recurrence=6, mean_backprop_depth=2)
    g = torch.Generator().manual_seed(0)
    draws = [sample_steps(cfg, g) for _ in range(4000)]
    assert all(k == min(2, n + k) and k >= 1 for n, k in draws)
    mean = sum(n + k for n, k in draws) / len(draws)
    assert 6.6 < mean < 7.4  # E[Poisson(LogNormal with mean R)] + 1 = R + 1
    assert len({n + k for n, k in draws}) > 8
    model = varied(cfg).train()
    ids = torch.randint(0, 256, (2, 6))
    seen = set()
    for _ in range(6):
        out = model(ids)
        seen.add(int(out.stats["huginn/steps"]))
        F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()).backward()
    assert len(seen) > 1 and model.num_slots() == 1 + 6 * 2 + 1  # eval: the mean again
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # truncated backprop: with the first steps under no_grad, the loss is the same function but the gradient
    # reaches the block only through the last step
    model.zero_grad()
    model._sampled = (2, 1)
    try:
        out = run_schedule(model, ids)
    finally:
        model._sampled = None
    full = varied(cfg).eval()
    with torch.no_grad(), full.override(steps=3):
        torch.testing.assert_close(out.logits, full(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole number of recurrences"), full.override(steps=2.5):
        pass
    # the gradient is that of the 3-step model whose state entering the last step is a constant
    calls = []

    def detach_last_step(module, args):
        calls.append(1)
        return (args[0].detach(), *args[1:]) if len(calls) == 3 else None

    handle = full.model.layers[1].register_forward_pre_hook(detach_last_step)  # the block's first layer
    try:
        with full.override(steps=3):
            reference = full(ids).logits
    finally:
        handle.remove()
    loss = lambda logits: F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())  # noqa: E731
    loss(out.logits).backward()
    loss(reference).backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_draws_do_not_depend_on_the_global_rng_and_survive_a_checkpoint(tmp_path):
    a, b = varied(tiny(mean_recurrence=6)).train(), varied(tiny(mean_recurrence=6)).train()
    torch.manual_seed(1)
    first = [a.draw_steps() for _ in range(5)]
    torch.manual_seed(2)  # another rank's RNG state
    assert [b.draw_steps() for _ in range(5)] == first and len(set(first)) > 1
    a.save_pretrained(tmp_path / "m")
    loaded = dyndepth.from_pretrained(tmp_path / "m").train()
    assert int(loaded.recurrence_draws) == 5 and loaded.draw_steps() == a.draw_steps()


@pytest.mark.parametrize("steps", [None, 5])
def test_cached_generation_equals_the_full_forward_left_padded(steps):
    model = varied(tiny())
    ids, mask = left_padded(T=12)
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with model.override(steps=steps), torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots())
        out = [model(ids[:, :8], attention_mask=mask[:, :8], positions=pos[:, :8], cache=cache).logits]
        for t in range(8, T):
            out.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(out, 1)
    torch.testing.assert_close(cached[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-4)
    prompt = torch.randint(0, 256, (2, 5))
    free = prompt
    with torch.no_grad():
        for _ in range(4):
            free = torch.cat([free, model(free).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(prompt, 4, stop_tokens=[]), free)


def test_save_load_round_trip(tmp_path):
    model = varied(tiny())
    model.save_pretrained(tmp_path / "m")
    loaded = dyndepth.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, HuginnLM) and loaded.config == dataclasses.replace(model.config, torch_dtype="float32")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def _sdpa_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    B, N, T, H = q_shape
    return 4 * B * N * (T * (T + 1) // 2 if is_causal else T * k_shape[2]) * H


def test_analytic_flops_equal_torchs_counter_and_the_ledger():
    model = varied(tiny())
    ids, mask = left_padded(T=12)
    for kwargs in ({}, {"attention_mask": mask}):
        with FlopCounterMode(display=False, custom_mapping={SDPA_CPU: _sdpa_flops}) as counter, torch.no_grad():
            out = model(ids, **kwargs)
        assert float(out.stats["flops/executed"]) == counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping={SDPA_CPU: _sdpa_flops}) as counter, torch.no_grad():
        out = model(ids)
    assert counter.get_total_flops() == model.forward_flops(12, B=3) == float(out.stats["flops/ideal"])
    assert float(out.stats["flops/dense"]) == model.forward_flops(12, B=3)
    for kw in ({}, {"qk_norm": True, "tie_word_embeddings": False, "attention_bias": True},
               {"n_layers_in_prelude": 0, "n_layers_in_coda": 0}):
        assert tiny(**kw).num_params() == HuginnLM(tiny(**kw)).num_params()
    fwd = model.forward_flops(12) / 12
    fixed = HuginnLM(dataclasses.replace(model.config, sample_recurrence=False))
    assert fixed.train_flops_per_token(12) == pytest.approx(3 * fwd)  # no sampler: 3 steps, all with grad
    with fixed.override(steps=5):  # training at another depth: the steps its forwards run
        assert fixed.train_flops_per_token(12) == pytest.approx(3 * fixed.forward_flops(12) / 12)
        assert fixed.forward_flops(12) > model.forward_flops(12)
    sampled = HuginnLM(dataclasses.replace(model.config, sample_recurrence=True))
    g = torch.Generator().manual_seed(1)
    draws = [sample_steps(sampled.config, g) for _ in range(30000)]

    def cost(n, k):  # the forward of n + k steps plus the backward of all but the n steps without grad
        with sampled.override(steps=n + k):
            fwd_nk = sampled.forward_flops(12)
        with sampled.override(steps=k):
            grad_part = sampled.forward_flops(12)
        return (fwd_nk + 2 * grad_part) / 12
    assert sampled.train_flops_per_token(12) == pytest.approx(sum(cost(*d) for d in draws) / len(draws), rel=1e-2)


RECIPE = ('[model]\ntype = "huginn"\nvocab_size = 264\nhidden_size = 32\nintermediate_size = 64\n'
          'num_attention_heads = 2\nnum_key_value_heads = 1\nn_layers_in_prelude = 1\n'
          'n_layers_in_recurrent_block = 1\nn_layers_in_coda = 1\nmean_recurrence = 2\nmean_backprop_depth = 1\n'
          '[train]\nbatch_size = 4\nseq_len = 16\nlog_every = 1\nwarmup = 1\nlr = 3e-3\nsteps = 12\n'
          'progress = false\nplot = false\ndevice = "cpu"\n[eval]\nenabled = false\n')


def test_the_trainer_trains_it_and_exports_a_loadable_model(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    result = run_training(tmp_path / "r.toml", [f"train.out_dir={tmp_path / 'run'}"])
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert isinstance(dyndepth.from_pretrained(tmp_path / "run" / "model"), HuginnLM)


def test_bad_configs_fail_with_one_clear_error():
    with pytest.raises(ValueError, match="mean_recurrence must be >= 1"):
        tiny(mean_recurrence=0)
    with pytest.raises(ValueError, match="no knob 'exit_kl'"), varied(tiny()).override(exit_kl=0.1):
        pass


def test_activation_checkpointing_gives_the_same_gradients_with_truncated_backprop():
    model = varied(tiny(mean_recurrence=4, mean_backprop_depth=2)).train()
    ckpt = copy.deepcopy(model)
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(0, 256, (2, 10))
    grads = []
    for m in (model, ckpt):
        m.draw_steps = lambda: (2, 2)
        F.cross_entropy(m(ids).logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)
