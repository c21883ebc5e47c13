import pytest
import torch

from dyndepth.core.accounting import ComputeLedger, sum_entries


def test_ledger_sums_per_slot_and_part_without_syncing():
    ledger = ComputeLedger()
    ledger.add(0, "attn", executed=100, ideal=torch.tensor(80), tokens=torch.tensor(3))
    ledger.add(0, "attn", executed=torch.tensor(50.0), ideal=40, tokens=2)
    ledger.add(1, "mlp", executed=30, ideal=30, tokens=4)
    ledger.add(-1, "lm_head", executed=7, ideal=5)
    assert isinstance(ledger.ideal[(0, "attn")], torch.Tensor)  # kept as a tensor until read
    assert ledger.total("executed") == 187 and ledger.total("ideal") == 155
    assert ledger.total("executed", part="attn") == 150 and ledger.total("ideal", slot=1) == 30
    assert float(ledger.total_tensor("ideal")) == 155
    assert ledger.tokens_processed(0, "attn") == 5 and ledger.slots() == [0, 1]
    report = ledger.report(valid_tokens=10)
    assert report["slots"][0]["attn"] == {"executed": 150, "ideal": 120, "processed": 0.5}
    assert report["parts"]["lm_head"] == {"executed": 7, "ideal": 5}
    with pytest.raises(ValueError, match="not one of"):
        ledger.add(0, "attention", 1, 1)


def test_sum_entries_adds_numbers_and_tensors_of_any_dtype_exactly():
    assert sum_entries([]).item() == 0 and sum_entries([]).dtype == torch.float64
    assert sum_entries([3, 4.5]).item() == 7.5
    # integer counts add exactly in int64: in float64, 2**53 + 1 would round to 2**53 before the + 1
    ints = sum_entries([torch.tensor(2**53 + 1), torch.tensor(1, dtype=torch.int32)])
    assert ints.dtype == torch.float64 and ints.item() == 2**53 + 2
    mixed = sum_entries([torch.tensor(1.25), torch.tensor([3]), torch.tensor(2, dtype=torch.int64), 1])
    assert mixed.item() == 7.25


def test_recomputation_in_backward_does_not_count_twice(tiny_config):
    """Activation checkpointing runs each layer again in backward; the forward's ledger (`out.compute`) is closed by
    then, so reading it after backward gives the forward's FLOPs, not the forward's plus the recomputation's."""
    from dyndepth import CausalLM
    from dyndepth.train.parallel import apply_activation_checkpointing

    model = CausalLM(tiny_config)
    apply_activation_checkpointing(model)
    out = model(torch.randint(0, tiny_config.vocab_size, (2, 8)))
    executed, ideal = out.compute.total("executed"), out.compute.total("ideal")
    out.logits.float().square().mean().backward()
    assert out.compute.total("executed") == executed and out.compute.total("ideal") == ideal
    with pytest.raises(ValueError, match="part"):  # a closed ledger still rejects a misspelled part
        out.compute.add(0, "mlpp", executed=1, ideal=1)


def test_generate_keeps_no_ledger_unless_asked_and_the_switch_changes_no_output(tiny_config):
    """`generate` decodes under `accounting(False)` (its steps' statistics are never read; counting them cost a
    decode step several ops a layer); an outer `accounting(True)` keeps the ledger. Logits are the same either way."""
    from dyndepth import CausalLM
    from dyndepth.core.accounting import accounting, accounting_enabled

    torch.manual_seed(0)
    model = CausalLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append((out.compute.enabled, dict(out.stats))))
    try:
        plain = model.generate(ids, 3, stop_tokens=[])
        assert [enabled for enabled, _ in seen] == [False, False, False]  # the prefill and two decode steps
        assert all(not any(k.startswith("flops/") for k in stats) for _, stats in seen)
        seen.clear()
        with accounting(True):
            counted = model.generate(ids, 3, stop_tokens=[])
        assert [enabled for enabled, _ in seen] == [True, True, True]
        assert all(float(stats["flops/executed"]) > 0 for _, stats in seen)
    finally:
        hook.remove()
    assert torch.equal(plain, counted) and accounting_enabled()  # (the default again outside)
    with torch.no_grad():
        on = model(ids)
        with accounting(False):
            off = model(ids)
    assert torch.equal(on.logits, off.logits) and "flops/executed" not in off.stats
    assert off.compute.total("executed") == 0 and on.compute.total("executed") > 0


def test_the_accounting_switch_is_per_thread_and_speculative_decoding_keeps_its_ledger(tiny_config):
    """A thread decoding without a ledger leaves another thread's forwards counted; speculative decoding reports the
    FLOPs its forwards ran even inside `accounting(False)` (it read them from `stats` and failed there)."""
    import threading

    from dyndepth import CausalLM
    from dyndepth.core.accounting import accounting
    from dyndepth.methods import attach_gateskip, calibrate
    from dyndepth.methods.speculative import speculative_generate

    torch.manual_seed(0)
    model = CausalLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 6))
    inside, outside = threading.Event(), threading.Event()

    def other():
        with accounting(False):
            inside.set()
            outside.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    with torch.no_grad():
        counted = "flops/executed" in model(ids).stats  # while the other thread sits inside accounting(False)
    outside.set()
    thread.join()
    assert counted
    attach_gateskip(model)
    calibrate(model, [torch.randint(0, tiny_config.vocab_size, (2, 16))], budget=0.5)
    with accounting(False):
        out, stats = speculative_generate(model, ids, 5, stop_tokens=[], draft_budget=0.5)
    assert torch.equal(out, model.generate(ids, 5, stop_tokens=[]))
    assert stats.draft_flops > 0 and stats.verify_flops > 0 and stats.prefill_flops > 0
