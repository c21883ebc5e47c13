"""The lm-eval adapter against lm-eval's own `hf` backend (HFLM on transformers), same exported checkpoint."""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # HFLM imports it

from lm_eval.api.instance import Instance

from dyndepth.eval.harness import DyndepthLM
from dyndepth.eval.model_args import method_knobs, split_knobs
from dyndepth.methods import attach_gateskip

LOGLIKELIHOOD = [
    ("The quick brown", " fox jumps"),
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("", "A man is sitting on a roof."),  # empty context: scored after the prefix token
    ("She bends down and ", "grabs the pole."),  # trailing space moves to the continuation
    ("duck eggs " * 12, "over the lazy dog"),  # longer than max_length: truncated from the left
]
ROLLING = ["Janet sells 16 - 3 - 4 = 9 duck eggs a day. #### 9 " * 3, "hi", "How do I ready a guinea pig cage?"]
PROMPTS = ["The quick", "Question: Which gas do", "Janet sells", "How do I"]
MAX_LENGTH = 24  # small, so rolling scores span several windows and truncation is exercised


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    from lm_eval.models.huggingface import HFLM

    folder, _ = tiny_checkpoint
    ours = DyndepthLM(pretrained=str(folder), device="cpu", batch_size=3, max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(folder), device="cpu", batch_size=3, max_length=MAX_LENGTH, dtype="float32")
    return ours, hf


def test_loglikelihood_equals_hf_backend(pair):
    ours, hf = pair
    a = ours.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)
    b = hf.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)
    assert len(a) == len(LOGLIKELIHOOD)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b):
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert greedy_a == greedy_b
    # a context of spaces only hands them to the continuation (lm-eval's split), which is then scored after the
    # prefix token as for an empty context ("num_logits must lie in [1, 7]" before; HFLM fails an assertion)
    (spaces, _), (empty, _) = ours.loglikelihood(requests("loglikelihood", [("  ", "hello"), ("", "  hello")]),
                                                 disable_tqdm=True)
    assert spaces == pytest.approx(empty, abs=1e-5)
    # the model's own greedy continuation is flagged greedy
    context = ours.tok_encode(LOGLIKELIHOOD[0][0])
    ids = ours.model.generate(torch.tensor([context]), 3, stop_tokens=[])[0, len(context):].tolist()
    (ll, greedy), = ours._loglikelihood_tokens([(None, context, ids)], disable_tqdm=True)
    assert greedy and ll < 0


def test_loglikelihood_rolling_equals_hf_backend(pair):
    ours, hf = pair
    a = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in ROLLING]), disable_tqdm=True)
    b = hf.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in ROLLING]), disable_tqdm=True)
    assert len(ours.tok_encode(ROLLING[0])) > 2 * MAX_LENGTH  # several windows
    assert a == pytest.approx(b, abs=1e-4)


def test_generate_until_matches_hf_greedy(pair):
    ours, hf = pair
    free = ours.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in PROMPTS]),
                               disable_tqdm=True)
    # stop strings taken from the free-running text, so they really cut (and end the batch early)
    stops = [t[3:5] for t in free if len(t) >= 5]
    args = [(p, {"until": stops[:1], "max_gen_toks": 12}) for p in PROMPTS]
    args += [(p, {"until": [], "max_gen_toks": 12, "do_sample": False}) for p in PROMPTS[:2]]
    a = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    b = hf.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert a == b
    assert a[len(PROMPTS):] == free[:2]
    assert any(len(x) < len(y) for x, y in zip(a, free)), "a stop string should have cut some output"


def test_a_temperature_without_do_sample_samples_as_the_hf_backend(pair):
    """lm-eval's normalize_gen_kwargs samples when a request gives a temperature > 0 and no do_sample (lm-eval's
    --gen_kwargs temperature=0.8 on a task without do_sample); the adapter decoded those greedily."""
    from lm_eval.models.utils import normalize_gen_kwargs

    from dyndepth.eval.harness import _generation_options

    ours, _ = pair
    for gen in ({}, {"temperature": 0.0}, {"temperature": 0.8}, {"do_sample": False, "temperature": 0.8},
                {"do_sample": True, "temperature": 0.8}):
        hf = normalize_gen_kwargs(gen)
        expected = hf["temperature"] if hf["do_sample"] else 0.0
        assert _generation_options(gen, 8)["temperature"] == expected, gen
    greedy = ours.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in PROMPTS]),
                                 disable_tqdm=True)
    torch.manual_seed(0)
    hot = ours.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12, "temperature": 50.0})
                                                          for p in PROMPTS]), disable_tqdm=True)
    assert hot != greedy


def test_do_sample_without_a_positive_temperature_is_an_error_as_in_the_hf_backend():
    """lm-eval's hf backend passes do_sample=True without a temperature as temperature 0.0, which transformers'
    generate rejects (strictly positive, or do_sample=False); the adapter sampled such requests at 1.0 (and decoded
    do_sample=True, temperature=0.0 greedily)."""
    from dyndepth.eval.harness import _generation_options

    for gen in ({"do_sample": True}, {"do_sample": "true"}, {"do_sample": True, "temperature": 0.0}):
        with pytest.raises(ValueError, match=r"temperature > 0.*do_sample=False"):
            _generation_options(gen, 8)
    assert _generation_options({"do_sample": True, "temperature": 1.0}, 8)["temperature"] == 1.0


def test_a_sampled_request_takes_top_k_and_top_p_as_transformers_does(tiny_checkpoint, tmp_path, monkeypatch):
    """transformers' generate (the hf backend's) samples a request that names no top_k / top_p with the checkpoint's
    generation_config.json values (Qwen3's top_k 20, top_p 0.95), else its defaults (top_k 50); the adapter sampled
    from the whole vocabulary."""
    import json
    import shutil

    from dyndepth.eval.harness import _generation_options

    sampled = {"do_sample": True, "temperature": 0.7}
    assert _generation_options(sampled, 8)["top_k"] == 50 and _generation_options(sampled, 8)["top_p"] == 1.0
    qwen3 = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    options = _generation_options(sampled, 8, qwen3)
    assert (options["top_k"], options["top_p"]) == (20, 0.95)
    assert _generation_options({**sampled, "top_k": 5}, 8, qwen3)["top_k"] == 5  # the request's own first
    assert _generation_options({"do_sample": False}, 8, qwen3)["top_k"] is None  # greedy: nothing to filter
    assert _generation_options(sampled, 8, {"top_k": 0})["top_k"] is None  # transformers' 0: no top-k cut (it was
    # handed on to generate, which refuses a top_k below 1)
    shutil.copytree(tiny_checkpoint[0], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps(qwen3))
    lm = DyndepthLM(pretrained=str(tmp_path / "ckpt"), device="cpu")
    seen = {}
    generate = lm.model.generate
    monkeypatch.setattr(lm.model, "generate", lambda *a, **kw: seen.update(kw) or generate(*a, **kw))
    lm.generate_until(requests("generate_until", [("The quick", {"max_gen_toks": 3, **sampled})]), disable_tqdm=True)
    assert (seen["top_k"], seen["top_p"], seen["temperature"]) == (20, 0.95, 0.7)


def test_a_checkpoints_repetition_penalty_decodes_as_the_hf_backend(tiny_checkpoint, tmp_path):
    """transformers' generate applies generation_config.json's repetition_penalty (Qwen2.5-Instruct: 1.05) to every
    request without its own, greedy too; the adapter ignored it and generated other text than the hf backend."""
    import json
    import shutil

    from lm_eval.models.huggingface import HFLM

    shutil.copytree(tiny_checkpoint[0], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.5}))
    kw = {"pretrained": str(tmp_path / "ckpt"), "device": "cpu", "batch_size": 1, "max_length": MAX_LENGTH}  # (batch 1:
    # transformers also penalizes the pad id of a padded batch)
    ours, hf = DyndepthLM(**kw), HFLM(**kw, dtype="float32")
    gen = requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in PROMPTS])
    a = ours.generate_until(gen, disable_tqdm=True)
    assert a == hf.generate_until(gen, disable_tqdm=True)
    assert a != DyndepthLM(**{**kw, "pretrained": str(tiny_checkpoint[0])}).generate_until(gen, disable_tqdm=True)
    own = requests("generate_until", [(p, {"until": [], "max_gen_toks": 12, "repetition_penalty": 1.0})
                                      for p in PROMPTS])  # a request's own value first
    assert ours.generate_until(own, disable_tqdm=True) == hf.generate_until(own, disable_tqdm=True) != a


def test_every_name_lm_eval_gives_the_generation_budget_is_read_as_the_hf_backend_reads_it(pair):
    """max_tokens and max_completion_tokens (lm-eval's aliases of max_gen_toks, which the hf backend takes) were
    refused as unsupported generation kwargs; the first given, in lm-eval's order, is the budget."""
    from lm_eval.models.utils import normalize_gen_kwargs

    from dyndepth.eval.harness import _generation_options

    ours, hf = pair
    for gen in ({"max_tokens": 5}, {"max_completion_tokens": 4}, {"max_new_tokens": 6, "max_tokens": 3},
                {"max_gen_toks": None, "max_completion_tokens": 2}, {}):
        assert _generation_options(gen, 7)["max_new_tokens"] == normalize_gen_kwargs(gen, 7)["max_gen_toks"], gen
    args = [(p, {"until": [], "max_tokens": 5}) for p in PROMPTS[:2]] + [(PROMPTS[2], {"max_completion_tokens": 3})]
    a = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert a == hf.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert len(ours.tok_encode(a[2])) <= 3


def test_one_beam_is_taken_as_the_hf_backend_takes_it(pair):
    """lm-eval's norsummarize_instruct and norrewrite_instruct ask for num_beams: 1 (transformers' default: one beam),
    which the adapter refused as an unsupported generation kwarg; beam search (num_beams > 1) still is."""
    ours, hf = pair
    args = [(p, {"until": [], "max_gen_toks": 6, "do_sample": False, "num_beams": 1}) for p in PROMPTS[:2]]
    a = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert a == hf.generate_until(requests("generate_until", args), disable_tqdm=True)
    with pytest.raises(ValueError, match="num_beams=4: beam search is not supported"):
        ours.generate_until(requests("generate_until", [("hi", {"until": [], "num_beams": 4})]), disable_tqdm=True)


def test_generate_until_stops_at_generation_config_eos_ids_as_the_hf_backend(pair, tiny_checkpoint, tmp_path):
    # HFLM's transformers generate stops at generation_config.json's eos ids too (Qwen3: <|im_end|> and
    # <|endoftext|>); ours stopped at the tokenizer's EOS only and went on past the other one
    import json
    import shutil

    from lm_eval.models.huggingface import HFLM

    ours, _ = pair
    free = ours.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in PROMPTS]),
                               disable_tqdm=True)
    stop = ours.tok_encode(free[0])[3]  # a token the continuations emit
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ours.eot_token_id, stop]}))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())  # special, as a checkpoint's stop ids are: no
    content = next(k for k, v in tokenizer["model"]["vocab"].items() if v == stop)  # text of its own in a decode
    tokenizer["added_tokens"].append({"id": stop, "content": content, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    ours = DyndepthLM(pretrained=str(folder), device="cpu", batch_size=3, max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(folder), device="cpu", batch_size=3, max_length=MAX_LENGTH, dtype="float32")
    args = requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in PROMPTS])
    a = ours.generate_until(args, disable_tqdm=True)
    assert a == hf.generate_until(args, disable_tqdm=True)
    assert any(len(x) < len(y) for x, y in zip(a, free)), "the second stop id should have cut some output"


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint whose tokenizer's post-processor prepends <s>, as Llama's does (the Qwen3-style fixture
    adds nothing, so a harness that never added BOS matched the hf backend there only)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    import dyndepth

    texts = [c + t for c, t in LOGLIKELIHOOD] * 20 + ROLLING * 20 + PROMPTS * 20
    folder = tmp_path_factory.mktemp("llama_ckpt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-llama", vocab_size=300, bos_token_id=0, eos_token_id=1,
                                              max_position_embeddings=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def test_a_tokenizer_that_adds_bos_is_followed_as_the_hf_backend_follows_it(llama_checkpoint):
    from lm_eval.models.huggingface import HFLM

    ours = DyndepthLM(pretrained=str(llama_checkpoint), device="cpu", batch_size=3, max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(llama_checkpoint), device="cpu", batch_size=3, max_length=MAX_LENGTH, dtype="float32")
    assert ours.tok_encode("The quick")[0] == 0 == hf.tok_encode("The quick")[0]  # <s> first
    assert ours.tok_encode("The quick") == hf.tok_encode("The quick")
    assert ours.tok_encode("<s>The quick") == hf.tok_encode("<s>The quick")  # already there: not twice
    a = ours.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)
    b = hf.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)
    assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)
    rolling = requests("loglikelihood_rolling", [(t,) for t in ROLLING])
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-4)
    gen = requests("generate_until", [(p, {"until": [], "max_gen_toks": 8}) for p in PROMPTS])
    assert ours.generate_until(gen, disable_tqdm=True) == hf.generate_until(gen, disable_tqdm=True)
    off = DyndepthLM(pretrained=str(llama_checkpoint), device="cpu", add_bos_token=False)
    assert off.tok_encode("The quick") == ours.tok_encode("The quick")[1:]


def test_a_continuation_of_zero_tokens_stops_as_the_hf_backend_does_naming_the_request(tmp_path):
    """lm-eval encodes context + continuation whole and splits at the context's length: with GPT-2's BPE, ("1", "23")
    is the one token "123", all context. HFLM stops on it (an AssertionError), and so does the adapter, but it said "a
    continuation of 0 tokens cannot be scored with max_length=24", naming neither the request nor the cause."""
    import transformers
    from lm_eval.models.huggingface import HFLM
    from tokenizers import ByteLevelBPETokenizer

    import dyndepth

    shared = Path(os.environ.get("DYNDEPTH_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    gpt2 = shared / "tokenizers" / "gpt2"  # (../shared/data beside the repository, or $DYNDEPTH_SHARED_DATA)
    if not (gpt2 / "vocab.bpe").is_file():
        pytest.skip(f"the offline GPT-2 tokenizer files are not in {shared}")
    bpe = ByteLevelBPETokenizer(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id)).save_pretrained(tmp_path)
    ours = DyndepthLM(pretrained=str(tmp_path), device="cpu", batch_size=2, max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=2, max_length=MAX_LENGTH, dtype="float32")
    fine = requests("loglikelihood", [("The quick", " brown fox")])
    assert ours.loglikelihood(fine, disable_tqdm=True)[0][0] == pytest.approx(
        hf.loglikelihood(fine, disable_tqdm=True)[0][0], abs=1e-4)  # the same checkpoint under both
    merged = requests("loglikelihood", [("The quick", " brown fox"), ("1", "23")])
    with pytest.raises(AssertionError):
        hf.loglikelihood(merged, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"the request \('1', '23'\) has a continuation of 0 tokens: .* merges into "
                                         r"the context's last token"):
        ours.loglikelihood(merged, disable_tqdm=True)


def test_generation_stops_at_every_end_id_of_the_checkpoint(tmp_path):
    """Qwen3 ends at <|im_end|> and <|endoftext|> (generation_config.json's eos ids, else config.json's): the adapter
    stopped at the tokenizer's EOS only, so it ran on past the other and the text generated after it joined the
    answer; HFLM (transformers' generate) stops there."""
    from lm_eval.models.huggingface import HFLM

    import dyndepth
    from dyndepth.tokenizer import train_bpe

    texts = [c + t for c, t in LOGLIKELIHOOD] * 20 + ROLLING * 20 + PROMPTS * 20
    tok = train_bpe(iter(texts), vocab_size=320, special_tokens=("<|endoftext|>", "<|im_end|>"))
    im_end = tok.backend.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", vocab_size=320, max_position_embeddings=64,
                                              eos_token_id=[tok.eos_token_id, im_end]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        prompt = torch.tensor([tok.encode(PROMPTS[2])])
        free = model.generate(prompt, 8, stop_tokens=[])[0, prompt.shape[1]:].tolist()
        assert not {tok.eos_token_id, im_end} & set(free[:3])
        w = model.model.embed_tokens.weight  # (tied) swap two ids: the third greedy token is now <|im_end|>
        w[[free[2], im_end]] = w[[im_end, free[2]]]
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    ours = DyndepthLM(pretrained=str(tmp_path), device="cpu", batch_size=2, max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=2, max_length=MAX_LENGTH, dtype="float32")
    gen = requests("generate_until", [(p, {"until": [], "max_gen_toks": 8}) for p in PROMPTS])
    a = ours.generate_until(gen, disable_tqdm=True)
    assert a == hf.generate_until(gen, disable_tqdm=True)
    assert a[2] == tok.decode(free[:2])  # cut at <|im_end|>, not 8 tokens


CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_templated_requests_equal_the_hf_backend(tiny_checkpoint, tmp_path):
    """lm-eval's apply_chat_template=True raised NotImplementedError ('tokenizer_name'): now the tokenizer's template
    renders as transformers renders it for HFLM, the assistant's last message left open when lm-eval continues it."""
    import json

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dyndepth import from_pretrained
    from dyndepth.eval.run import TASKS_DIR
    from dyndepth.tokenizer import train_bpe

    folder, _ = tiny_checkpoint
    texts = [c + t for c, t in LOGLIKELIHOOD] * 20 + PROMPTS * 20
    tok = train_bpe(iter(texts), vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = CHAT
    tok.save(tmp_path / "ckpt")
    from_pretrained(folder).save_pretrained(tmp_path / "ckpt")  # (its 320 ids hold these 300)
    ours = DyndepthLM(pretrained=str(tmp_path / "ckpt"), device="cpu", batch_size=2, max_length=64)
    hf = HFLM(pretrained=str(tmp_path / "ckpt"), device="cpu", batch_size=2, max_length=64, dtype="float32")
    chats = [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown"}], True),
             ([{"role": "user", "content": "Question: Which gas?"}, {"role": "assistant", "content": "Answer: "}],
              False)]
    for chat, prompt in chats:
        assert ours.apply_chat_template(chat, prompt) == hf.apply_chat_template(chat, prompt)
    assert ours.apply_chat_template(*chats[1]).endswith("assistant\nAnswer: ")  # left open: no <|im_end|>
    contexts = [ours.apply_chat_template(chat, prompt) for chat, prompt in chats]
    reqs = requests("loglikelihood", [(c, " fox jumps") for c in contexts])
    a, b = ours.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)
    data = tmp_path / "data" / "eval_gauntlet"
    data.mkdir(parents=True)
    copa = {"query": "The woman retired, therefore", "choices": ["she got a pension.", "she paid."], "gold": 0}
    (data / "copa.jsonl").write_text(json.dumps(copa) + "\n")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,  # (indexing lm-eval's own: 6 s)
                          metadata={"data_dir": str(tmp_path / "data")})
    out = lm_eval.simple_evaluate(model=ours, tasks=["dyndepth_copa"], task_manager=manager, apply_chat_template=True,
                                  log_samples=True)
    context = out["samples"]["dyndepth_copa"][0]["arguments"][0][0]
    assert context.startswith("<|im_start|>user\nThe woman retired") and context.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="has none"):
        DyndepthLM(pretrained=str(folder), device="cpu").apply_chat_template(chats[0][0])


def test_a_template_that_prints_todays_date_renders_as_for_the_hf_backend(tiny_checkpoint, tmp_path):
    """Llama 3.2's template prints 'Today Date:' with transformers' strftime_now, else a fixed '26 Jul 2024': every
    chat-templated request's system header differed from HFLM's (the adapter's renderer had no strftime_now)."""
    from lm_eval.models.huggingface import HFLM

    from dyndepth import from_pretrained
    from dyndepth.tokenizer import train_bpe

    llama32 = ('{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}'
               '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
               '{%- endif %}{%- endif %}{{- "<|im_start|>system\\nToday Date: " + date_string + "<|im_end|>\\n" }}'
               + CHAT)
    tok = train_bpe(iter(PROMPTS * 20), vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = llama32
    tok.save(tmp_path)
    from_pretrained(tiny_checkpoint[0]).save_pretrained(tmp_path)
    ours = DyndepthLM(pretrained=str(tmp_path), device="cpu", max_length=64)
    hf = HFLM(pretrained=str(tmp_path), device="cpu", max_length=64, dtype="float32")
    chat = [{"role": "user", "content": "The quick brown"}]
    text = ours.apply_chat_template(chat)
    assert "Today Date: 26 Jul 2024" not in text
    assert text == hf.apply_chat_template(chat)


def test_enable_thinking_and_think_end_token_as_the_hf_backend_takes_them(tiny_checkpoint, tmp_path):
    """lm-eval's model arguments for Qwen3's chat template (enable_thinking=false: the empty thinking block in the
    generation prompt) and for cutting a generation's thinking (think_end_token, an id or its text) were refused as
    unknown model arguments; now they render, generate and refuse log-likelihoods as HFLM does."""
    from lm_eval.models.huggingface import HFLM

    from dyndepth import from_pretrained
    from dyndepth.tokenizer import train_bpe

    thinking = CHAT + ("{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
                       "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}")
    tok = train_bpe(iter(PROMPTS * 20), vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = thinking
    tok.save(tmp_path)
    from_pretrained(tiny_checkpoint[0]).save_pretrained(tmp_path)
    chat = [{"role": "user", "content": "The quick brown"}]
    hf = HFLM(pretrained=str(tmp_path), device="cpu", max_length=64, dtype="float32")
    for enable in (False, True):
        ours = DyndepthLM(pretrained=str(tmp_path), device="cpu", max_length=64, enable_thinking=enable,
                          think_end_token="</think>")
        hf.chat_template_args = {"enable_thinking": enable}  # (what HFLM(enable_thinking=...) sets)
        assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat)
        assert ours.apply_chat_template(chat).endswith("</think>\n\n") != enable
    with pytest.raises(ValueError, match="enable_thinking=true cannot score log-likelihoods"):
        ours.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD[:1]), disable_tqdm=True)
    with pytest.raises(ValueError, match="enable_thinking=true needs think_end_token"):
        DyndepthLM(pretrained=str(tmp_path), device="cpu", enable_thinking=True)
    plain = DyndepthLM(pretrained=str(tmp_path), device="cpu", max_length=64)
    args = [(p, {"until": [], "max_gen_toks": 8}) for p in PROMPTS[:2]]
    free = plain.generate_until(requests("generate_until", args), disable_tqdm=True)
    context = plain.tok_encode(PROMPTS[0])
    ids = plain.model.generate(torch.tensor([context]), 8, stop_tokens=plain._stop_ids)[0, len(context):].tolist()
    for end in (ids[2], free[0][3:5]):  # an id the text has and a piece of its text: both cut what precedes them
        ours = DyndepthLM(pretrained=str(tmp_path), device="cpu", max_length=64, think_end_token=end)
        hf.think_end_token = end  # (what HFLM(think_end_token=...) sets)
        a = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
        assert a == hf.generate_until(requests("generate_until", args), disable_tqdm=True)
        assert a[0] != free[0] and free[0].endswith(a[0])


def test_batch_size_does_not_change_scores(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    reqs = requests("loglikelihood", LOGLIKELIHOOD)
    one = DyndepthLM(pretrained=str(folder), device="cpu", batch_size=1, max_length=MAX_LENGTH)
    many = DyndepthLM(pretrained=str(folder), device="cpu", batch_size=8, max_length=MAX_LENGTH)
    a = [ll for ll, _ in one.loglikelihood(reqs, disable_tqdm=True)]
    b = [ll for ll, _ in many.loglikelihood(reqs, disable_tqdm=True)]
    assert a == pytest.approx(b, abs=1e-4)


def test_scores_that_overflow_float16_are_an_error_not_chance_accuracy(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    lm = DyndepthLM(pretrained=str(folder), device="cpu", dtype="float16")
    with torch.no_grad():  # activations past float16's 65504, as many checkpoints' outliers are
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(3e5)
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(30)
    with pytest.raises(FloatingPointError, match="not finite.*float16 model.*bfloat16 or float32"):
        lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)  # was NaN for every choice


def test_method_knobs_reach_the_method(tiny_checkpoint, tmp_path):
    """skip_budget is forwarded to GateSkip's override for scoring; other knobs pass through by name."""
    folder, tok = tiny_checkpoint
    from dyndepth import from_pretrained

    model = from_pretrained(folder)
    method = attach_gateskip(model)
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    reqs = requests("loglikelihood", LOGLIKELIHOOD[:2])
    base = DyndepthLM(pretrained=str(tmp_path), device="cpu", max_length=MAX_LENGTH)
    skip = DyndepthLM(pretrained=str(tmp_path), device="cpu", max_length=MAX_LENGTH, skip_budget=0.5,
                      mode="quantile")  # a knob passed through by its own name
    assert skip.knobs.fields == {"budget": 0.5, "mode": "quantile"}
    assert skip.knobs.generate == {"skip_budget": 0.5}
    assert skip.knobs.decode_fields == {"mode": "quantile"}
    a = [ll for ll, _ in base.loglikelihood(reqs, disable_tqdm=True)]
    b = [ll for ll, _ in skip.loglikelihood(reqs, disable_tqdm=True)]
    assert a != pytest.approx(b, abs=1e-3)  # half the tokens skipped every branch
    assert method_knobs(skip.model.method)["budget"] == 0.0  # the override is undone after each forward
    info = skip.get_model_info()
    assert info["method_knobs"] == {"budget": 0.5, "mode": "quantile"}  # (skip_budget: the same budget again)
    skipped = info["per_token_stats"]  # GateSkip's fractions (Python floats) are recorded next to the FLOPs
    assert skipped["gateskip/attn_skipped"] == pytest.approx(0.5, abs=0.1) and "flops/executed" in skipped
    assert base.get_model_info()["per_token_stats"]["gateskip/attn_skipped"] == 0.0
    assert base.get_model_info()["scoring_lookahead"] is None  # budget 0: no token ranked against later ones
    assert "ranks the whole batch's tokens, later ones included" in info["scoring_lookahead"]
    knobs = split_knobs(method, {"skip_budget": 0})
    assert (knobs.fields, knobs.generate) == ({"budget": 0.0}, {"skip_budget": 0.0})
    assert isinstance(knobs.fields["budget"], float)
    # both names of one knob: scoring forwards ran at budget=0.2 and generation at skip_budget=0.3, unsaid
    with pytest.raises(ValueError, match="model arguments skip_budget and budget both set the method's budget"):
        split_knobs(method, {"skip_budget": 0.3, "budget": 0.2})


def _gateskip_checkpoint(tiny_checkpoint, folder, budget: float) -> None:
    """The tiny checkpoint with GateSkip attached and its thresholds calibrated at `budget`, saved to `folder`."""
    from dyndepth import from_pretrained
    from dyndepth.methods import calibrate
    from dyndepth.tokenizer import encode_batch

    source, tok = tiny_checkpoint
    model = from_pretrained(source)
    attach_gateskip(model)
    calibrate(model, [encode_batch(tok, PROMPTS + [p for p, _ in LOGLIKELIHOOD[:2]])], budget=budget)
    model.save_pretrained(folder)
    tok.save(folder)


def test_recorded_statistics_are_per_token_whatever_the_batching_and_include_generation(tiny_checkpoint, tmp_path):
    """Per-token decisions (calibrated thresholds) at batch 1 and 4 give the same figures; they were means per forward
    (FLOPs per forward grew with the batch, fractions moved with the padding), and generation recorded nothing."""
    _gateskip_checkpoint(tiny_checkpoint, tmp_path, budget=0.3)
    reqs = requests("loglikelihood", LOGLIKELIHOOD[:4])
    infos = []
    for batch_size in (1, 4):
        lm = DyndepthLM(pretrained=str(tmp_path), device="cpu", batch_size=batch_size, skip_budget=0.3,
                        mode="threshold")
        lm.loglikelihood(reqs, disable_tqdm=True)
        infos.append(lm.get_model_info())
    one, four = (info["per_token_stats"] for info in infos)
    assert infos[0]["tokens_run"] == infos[1]["tokens_run"] > 0
    for key in ("flops/ideal", "flops/executed"):  # per token, batching moves them by what it really adds: the
        assert 1 <= four[key] / one[key] < 1.15, key  # padding (executed), the longest continuation's logits (both)
    # GateSkip's fraction is over its pool (EOS, here the empty context's prefix token, is outside it), a forward's
    # weight is its valid tokens: equal up to that one token
    assert one["gateskip/attn_skipped"] == pytest.approx(four["gateskip/attn_skipped"], rel=5e-3)
    assert 0 < one["gateskip/attn_skipped"] < 1 and one["flops/ideal"] < one["flops/executed"] * 1.01
    lm = DyndepthLM(pretrained=str(tmp_path), device="cpu", batch_size=2, skip_budget=0.3)
    lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 4}) for p in PROMPTS[:2]]),
                      disable_tqdm=True)
    info = lm.get_model_info()  # the prompts' prefill (2 rows) and up to 3 decode steps of 2 rows
    assert sum(len(lm.tok_encode(p)) for p in PROMPTS[:2]) < info["tokens_run"] <= \
        sum(len(lm.tok_encode(p)) for p in PROMPTS[:2]) + 2 * 3
    assert info["per_token_stats"]["flops/executed"] > 0


def test_fractions_are_weighted_by_tokens_and_only_flop_totals_are_divided():
    """MoR's tokens_r{r} are fractions of the tokens (a name check for "/tokens" divided them by the token count)."""
    import types

    rec = types.SimpleNamespace(_tokens=0.0, _stat_sums={})
    for n, frac, flops in ((4, 0.5, 400.0), (12, 0.25, 1200.0)):
        DyndepthLM._record(rec, {"tokens/valid": torch.tensor(n), "mor/tokens_r0": frac, "flops/executed": flops,
                                 "dnd/flops": flops / 2, "flag": True})
    stats = {k: v / rec._tokens for k, v in rec._stat_sums.items()}
    assert rec._tokens == 16 and "flag" not in stats and "tokens/valid" not in stats
    assert stats == {"mor/tokens_r0": pytest.approx((4 * 0.5 + 12 * 0.25) / 16), "flops/executed": 100.0,
                     "dnd/flops": 50.0}


def test_bad_arguments_name_the_valid_ones(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="no adaptive-depth method.*batch_size"):
        DyndepthLM(pretrained=str(folder), device="cpu", skip_budget=0.3)
    model = DyndepthLM(pretrained=str(folder), device="cpu").model
    method = attach_gateskip(model)
    with pytest.raises(ValueError, match="bugdet.*skip_budget.*budget"):
        split_knobs(method, {"bugdet": 0.3})
    with pytest.raises(ValueError, match="budget"):
        split_knobs(method, {"skip_budget": 1.5})  # GateSkipConfig's own check, at construction time
    with pytest.raises(ValueError, match="dtype"):
        DyndepthLM(pretrained=str(folder), device="cpu", dtype="float64")
    for bad in ("0", "-5", "abc", "2.5"):  # 0 became the model's window; -5 failed at the first request; abc said
        # "invalid literal for int() with base 10: 'abc'", naming no argument
        with pytest.raises(ValueError, match=f"max_length={bad}: give a positive number of tokens"):
            DyndepthLM(pretrained=str(folder), device="cpu", max_length=bad)
    for bad in (0, "many"):
        with pytest.raises(ValueError, match=f"max_gen_toks={bad}: give a positive number of tokens"):
            DyndepthLM(pretrained=str(folder), device="cpu", max_gen_toks=bad)
    with pytest.raises(ValueError, match="model argument add_bos_token='maybe' must be true or false"):  # named no
        DyndepthLM(pretrained=str(folder), device="cpu", add_bos_token="maybe")  # argument: "expected true or false"
    with pytest.raises(ValueError, match="vocab_size"):
        DyndepthLM(pretrained="tiny-qwen3", device="cpu")  # a preset (random weights), 259-id byte tokenizer
    lm = DyndepthLM(pretrained=str(folder), device="cpu")
    with pytest.raises(ValueError, match="supported"):
        lm.generate_until(requests("generate_until", [("hi", {"until": [], "num_beams": 4})]), disable_tqdm=True)


def test_a_window_past_the_models_context_is_refused_before_any_request(tiny_checkpoint):
    """max_length=512 on a model of 256 positions was taken, and the first request longer than 256 tokens failed in
    the model's forward (after every shorter task had scored; the hf backend scores it, transformers' RoPE
    extrapolates, but a dyndepth model refuses positions past max_position_embeddings); now the adapter refuses it."""
    folder, _ = tiny_checkpoint
    with pytest.raises(ValueError, match=r"max_length=512 exceeds the model's max_position_embeddings \(256\)"):
        DyndepthLM(pretrained=str(folder), device="cpu", max_length=512)
    assert DyndepthLM(pretrained=str(folder), device="cpu", max_length=256).max_length == 256


def test_registered_with_lm_eval(tiny_checkpoint):
    from lm_eval.api.registry import get_model

    folder, _ = tiny_checkpoint
    assert get_model("dyndepth") is DyndepthLM
    lm = DyndepthLM.create_from_arg_string(f"pretrained={folder},max_length=32", {"batch_size": "2", "device": None})
    assert (lm.batch_size, lm.max_length, lm.device) == (2, 32, torch.device("cpu"))


def test_skip_budget_decodes_with_calibrated_thresholds(tiny_checkpoint, tmp_path):
    """generate_until passes skip_budget to model.generate, which decodes with the calibrated thresholds."""
    _gateskip_checkpoint(tiny_checkpoint, tmp_path, budget=0.5)
    reqs = requests("generate_until", [(p, {"until": [], "max_gen_toks": 6}) for p in PROMPTS])
    skip = DyndepthLM(pretrained=str(tmp_path), device="cpu", skip_budget=0.5).generate_until(reqs, disable_tqdm=True)
    lm = DyndepthLM(pretrained=str(tmp_path), device="cpu")
    direct = []
    for p in PROMPTS:
        ids = torch.tensor([lm.tok_encode(p)])
        out = lm.model.generate(ids, 6, stop_tokens=[lm.eot_token_id], skip_budget=0.5)
        direct.append(lm.tok_decode(out[0, ids.shape[1]:].tolist()))
    assert skip == direct
    other = DyndepthLM(pretrained=str(tmp_path), device="cpu", skip_budget=0.3)
    with pytest.raises(ValueError, match="calibrat"):
        other.generate_until(reqs, disable_tqdm=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_lm_evals_default_cuda_device_falls_back_to_cpu_without_cuda(tiny_checkpoint, caplog):
    # lm-eval's command line passes device="cuda:0" unless told otherwise: the adapter raised on a CPU-only host,
    # where HFLM (and the documented default, "cuda if available, else cpu") evaluates on the CPU
    with caplog.at_level("WARNING"):
        lm = DyndepthLM(pretrained=str(tiny_checkpoint[0]), device="cuda:0", batch_size=2)
    assert lm.device.type == "cpu" and "no CUDA device is visible" in caplog.text
