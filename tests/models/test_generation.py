import pytest
import torch

from dyndepth import CausalLM, preset
from dyndepth.generation import sample_next


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CausalLM(preset("tiny-qwen3")).eval()


def greedy_without_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_cached_greedy_equals_uncached_greedy(model):
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, 12, stop_tokens=[]), greedy_without_cache(model, ids, 12))


def test_stop_tokens_pad_finished_rows_and_end_early(model):
    ids = torch.randint(0, 256, (2, 4))
    free = model.generate(ids, 10, stop_tokens=[])
    stop = int(free[0, 6])  # row 0 emits this at its 3rd new token
    out = model.generate(ids, 10, stop_tokens=[stop], pad_token_id=7)
    row0 = out[0, 4:].tolist()
    k = row0.index(stop)
    assert all(t == 7 for t in row0[k + 1:])
    if stop not in out[1, 4:].tolist():
        assert out.shape[1] == 14  # row 1 never stopped, so the loop ran to the end


def test_callback_streams_every_new_column(model):
    ids = torch.randint(0, 256, (2, 4))
    seen = []
    out = model.generate(ids, 6, stop_tokens=[], callback=lambda i, tok: seen.append(tok.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out[:, 4:])


def test_sampling_is_reproducible_with_a_generator(model):
    ids = torch.randint(0, 256, (2, 4))
    a = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, stop_tokens=[],
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, stop_tokens=[],
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(500, 5)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, ...: top_p=0.8 keeps {0, 1}
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert sample_next(logits, 0.0).eq(0).all()


def test_generation_rejects_bad_input(model):
    ids = torch.randint(0, 256, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 3, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, 10_000)
    with pytest.raises(ValueError, match="batch, time"):
        model.generate(ids[0], 3)


@pytest.mark.slow
def test_compiled_decode_matches_eager(model):
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(model.generate(ids, 6, stop_tokens=[], compile=True), model.generate(ids, 6, stop_tokens=[]))
