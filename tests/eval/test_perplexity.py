"""Sliding-window perplexity against slow per-token loops and numbers computed by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

import dyndepth
from dyndepth.eval.perplexity import file_perplexity, sliding_window_nll, text_perplexity, windows
from dyndepth.tokenizer import ByteTokenizer

TEXT = "Janet sells 16 - 3 - 4 = 9 duck eggs a day. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_and_tok(tiny_checkpoint):
    folder, tok = tiny_checkpoint
    return dyndepth.from_pretrained(folder).eval(), tok


def token_nll(model, context: torch.Tensor, target: int) -> float:
    """-log p(target | context), one forward of the context alone."""
    with torch.no_grad():
        logits = model(context[None]).logits[0, -1].float()
    return float(-logits.log_softmax(-1)[target])


@pytest.mark.parametrize("n,max_length,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (23, 8, 3), (9, 16, 5)])
def test_windows_score_every_token_once_within_max_length(n, max_length, stride):
    seen = []
    for begin, end, scored in windows(n, max_length, stride):
        assert 0 <= begin < end and end - begin <= max_length and 1 <= scored <= end - begin
        seen += range(end + 1 - scored, end + 1)
    assert seen == list(range(1, n))


def test_full_context_equals_slow_loop(model_and_tok):
    """max_length >= the text's length: one window, every token conditioned on everything before it."""
    model, tok = model_and_tok
    ids = torch.tensor([tok.eos_token_id, *tok.encode(TEXT)])
    reference = sum(token_nll(model, ids[:t], int(ids[t])) for t in range(1, len(ids)))
    for stride in (1, len(ids)):
        nll, n = sliding_window_nll(model, ids, max_length=len(ids), stride=min(stride, len(ids)))
        assert n == len(ids) - 1
        assert nll == pytest.approx(reference, rel=1e-5)


def test_sliding_window_equals_slow_loop(model_and_tok):
    """Target t (1-based) sees all earlier tokens if t <= L, else the L tokens before its chunk's last target."""
    model, tok = model_and_tok
    ids = torch.tensor([tok.eos_token_id, *tok.encode(TEXT)])
    L, s, n = 8, 3, len(ids)
    assert n > 3 * L
    reference = 0.0
    for t in range(1, n):
        if t <= L:
            start = 0
        else:
            stop = min(L + 1 + math.ceil((t - L) / s) * s, n)  # one past the last target of t's chunk
            start = stop - 1 - L
        reference += token_nll(model, ids[start:t], int(ids[t]))
    for batch_size in (1, 4):
        nll, count = sliding_window_nll(model, ids, max_length=L, stride=s, batch_size=batch_size)
        assert count == n - 1
        assert nll == pytest.approx(reference, rel=1e-5)


def test_perplexity_by_hand(model_and_tok):
    """A 4-token text in one window: exp(mean NLL) from a single forward, and a uniform model exactly."""
    model, tok = model_and_tok
    text = "fox jumps"
    ids = [tok.eos_token_id, *tok.encode(text)]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    nlls = [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    result = text_perplexity(model, tok, text, max_length=32)
    assert result.tokens == len(ids) - 1 and result.bytes == len(text) and result.words == 2
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(sum(nlls) / math.log(2) / len(text), rel=1e-5)

    V = 300  # every next token equally likely: perplexity V, log2(V) bits per byte-token
    r = text_perplexity(_Uniform(V), ByteTokenizer(), "abcdefghij", max_length=4, stride=3)
    assert r.tokens == 10 and r.perplexity == pytest.approx(V)
    assert r.bits_per_byte == pytest.approx(math.log2(V))
    assert r.word_perplexity == pytest.approx(V ** 10)  # one word, ten tokens


class _Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=64, vocab_size=vocab)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, num_logits=None):
        logits = torch.zeros(*ids.shape, self.config.vocab_size)  # (B, T, V)
        return SimpleNamespace(logits=logits[:, -num_logits:] if num_logits else logits)


def test_disjoint_windows_equal_lm_eval_rolling(tiny_checkpoint, model_and_tok):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from dyndepth.eval.harness import DyndepthLM

    folder, _ = tiny_checkpoint
    model, tok = model_and_tok
    lm = DyndepthLM(pretrained=str(folder), device="cpu", max_length=10)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)], disable_tqdm=True)
    result = text_perplexity(model, tok, TEXT, max_length=10, stride=10)
    assert -rolling == pytest.approx(result.nll, rel=1e-5)


def test_a_per_word_loss_past_floats_range_reports_inf_not_an_overflow(model_and_tok, tmp_path):
    model, tok = model_and_tok
    blob = "x7Kq" * 100  # one 400-character word: ~5 nats a byte token, ~2000 nats for the word
    path = tmp_path / "blob.txt"
    path.write_text(blob)
    result = file_perplexity(model, tok, path, max_length=64, stride=64)
    assert result.words == 1 and result.nll > 710  # math.exp raised OverflowError here
    report = result.to_dict()
    assert report["word_perplexity"] == math.inf and math.isfinite(report["perplexity"])


def test_file_and_errors(model_and_tok, tmp_path):
    model, tok = model_and_tok
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert file_perplexity(model, tok, path, max_length=16).nll == pytest.approx(
        text_perplexity(model, tok, TEXT, max_length=16).nll)
    with pytest.raises(ValueError, match="stride"):
        text_perplexity(model, tok, TEXT, max_length=8, stride=9)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        text_perplexity(model, tok, TEXT, max_length=10_000)
    with pytest.raises(FileNotFoundError, match="no such"):
        file_perplexity(model, tok, tmp_path / "missing.txt")
    for size in (0, -3):
        with pytest.raises(ValueError, match=f"batch_size={size} must be a positive integer"):
            text_perplexity(model, tok, TEXT, batch_size=size)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        file_perplexity(model, tok, latin)


def test_float16_activations_that_overflow_are_an_error_not_a_nan_perplexity():
    """The lm-eval scores and generation stop at a non-finite value (docs/eval.md's dtype row); a perplexity run
    reported perplexity nan (null in results.json) as if it were a measurement."""
    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", vocab_size=300)).eval()
    with torch.no_grad():  # activations past float16's 65504, as many checkpoints' outliers are
        model.model.layers[0].mlp.down_proj.weight.mul_(3e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(30)
    text = "hello world, this is a test " * 3
    assert math.isfinite(text_perplexity(model, ByteTokenizer(), text, max_length=32, stride=16).perplexity)
    with pytest.raises(FloatingPointError, match="logits of a perplexity window are not finite.*float16 model"):
        text_perplexity(model.half(), ByteTokenizer(), text, max_length=32, stride=16)
