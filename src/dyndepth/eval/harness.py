"""lm-evaluation-harness adapter: dyndepth models as the lm-eval model "dyndepth".

Shape legend: B batch, T tokens, V vocab.

    import dyndepth.eval.harness, lm_eval                       # the import registers "dyndepth"
    lm_eval.simple_evaluate(model="dyndepth", model_args="pretrained=DIR,skip_budget=0.3", tasks=["piqa"])
    dyndepth eval DIR --tasks piqa --model-args skip_budget=0.3  # the same from a shell

lm-eval 0.4.x finds models only in its own registry (no entry-point discovery), so `lm_eval --model
dyndepth` typed in a shell does not see this adapter: use `dyndepth eval`, or import this module first.

Scores follow lm-eval's `hf` backend request for request: the same context/continuation split (done
by `TemplateLM`), prefix token (BOS, else EOS), left truncation to `max_length`, rolling windows for
`loglikelihood_rolling` and stop handling for `generate_until`; a checkpoint exported with
`save_pretrained` scores the same under both backends (tests/eval/test_harness.py); log-probs are taken in
float32 whatever the model's dtype, as the hf backend's softmax_dtype=float32 does (its default: the model's
dtype). Requests run in batches sorted by length; generation is KV-cached and batched (`model.generate`), and a
batch ends as soon as every row has produced EOS (or another of the checkpoint's end ids) or one of the task's
stop strings.

Method knobs (eval/model_args.py): every model argument that is not an adapter argument is a knob of
the adaptive-depth method attached from the checkpoint's config.json: a name in `NAMED_KNOBS` (e.g.
`skip_budget`), or any other runtime knob the method's `override` accepts (e.g. GateSkip's `mode`).
Knobs apply to every scoring forward through `method.override(**fields)`; a named knob with a
`generate` keyword is passed to `model.generate` for decoding instead. Anything else is an error
naming the valid arguments.
"""

from __future__ import annotations

import functools
import json
import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dyndepth.config import position_limit, position_limit_name
from dyndepth.core.accounting import accounting
from dyndepth.eval.model_args import add_stats, as_bool, batch_count, load_for_eval, token_count
from dyndepth.generation import check_finite

log = logging.getLogger(__name__)

# lm-eval's names of the generation budget, in its order of precedence (normalize_gen_kwargs; the hf backend takes all)
MAX_TOKENS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GEN_KWARGS = ("until", *MAX_TOKENS, "do_sample", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")
# what transformers' generate samples with when a request names no top_k / top_p: the checkpoint's
# generation_config.json (Qwen3: 20 and 0.95), else its GenerationConfig defaults (the 50 likeliest tokens)
SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0}


class _AllStopped(Exception):
    """Raised from the generate callback once every row has produced EOS or a stop string."""


@register_model("dyndepth")
class DyndepthLM(TemplateLM):
    """A dyndepth CausalLM behind lm-eval's `LM` interface (see the module docstring)."""

    def __init__(self, pretrained, tokenizer=None, dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, enable_thinking: bool | None = None,
                 think_end_token: str | int | None = None, **knobs) -> None:
        super().__init__()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %r: no CUDA device is visible, so the evaluation runs on cpu (lm-eval's command line "
                        "asks for cuda:0 unless given --device).", device)
            device = "cpu"
        loaded = load_for_eval(pretrained, tokenizer, dtype, device, **knobs)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.knobs, self._device, self._lookahead = loaded.knobs, loaded.device, loaded.lookahead
        self.batch_size_per_gpu = batch_count(batch_size)
        positions = position_limit(self.model.config)  # (YaRN's longer reach, asked for by max_length only: unset,
        # the hf backend's default, config.json's max_position_embeddings, which it truncates contexts to)
        self._max_length = token_count("max_length", max_length) or self.model.config.max_position_embeddings
        if self._max_length > positions:  # (else the first longer request failed in the forward, after the rest)
            raise ValueError(f"max_length={self._max_length} exceeds the model's "
                             f"{position_limit_name(self.model.config)}; pass a smaller max_length, or leave it out "
                             "for the model's.")
        self._max_gen_toks = token_count("max_gen_toks", max_gen_toks)
        try:
            self.add_bos_token = None if add_bos_token is None else as_bool(add_bos_token)  # None: the tokenizer's rule
        except ValueError:  # (it named no argument)
            raise ValueError(f"model argument add_bos_token={add_bos_token!r} must be true or false (or left out: the "
                             "tokenizer's rule).") from None
        # as the hf backend's: the chat template's enable_thinking (Qwen3's), and where a generation's thinking ends
        # (a token id, or its text), which then is cut off
        try:
            self.enable_thinking = None if enable_thinking is None else as_bool(enable_thinking)
        except ValueError:
            raise ValueError(f"model argument enable_thinking={enable_thinking!r} must be true or false (or left out: "
                             "the chat template's default).") from None
        digits = isinstance(think_end_token, str) and think_end_token.isdigit()
        self.think_end_token = int(think_end_token) if digits else think_end_token
        if self.enable_thinking and self.think_end_token is None:
            raise ValueError("enable_thinking=true needs think_end_token (the id or text that ends the thinking, "
                             "Qwen3's </think>), which generations are cut after, as the hf backend requires.")
        source = tokenizer if isinstance(tokenizer, str) else pretrained if isinstance(pretrained, str) else None
        self._tokenizer_name = str(source or type(self.tokenizer).__name__).replace("/", "__")  # (as HFLM's)
        self._stat_sums: dict[str, float] = {}
        self._tokens = 0.0  # valid tokens of the forwards recorded (scoring, prefill and decode steps)

    # ------------------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = next(iter(self.model.config.eos_token_ids), None)
        if eos is None:
            raise ValueError("neither the tokenizer nor config.json names an EOS token; lm-eval needs one "
                             "(set eos_token_id in config.json or use a tokenizer with an eos token).")
        return eos

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @functools.cached_property
    def _prefix_text(self) -> str:
        """The prefix token's text: a string that starts with it gets no special tokens (`tok_encode`)."""
        return self.tokenizer.decode([self.prefix_token_id], skip_special=False)

    @property
    def tokenizer_name(self) -> str:
        """Names lm-eval's request cache of chat-templated requests (lm-eval asks for it with apply_chat_template)."""
        return self._tokenizer_name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's apply_chat_template=True (it raised NotImplementedError): the tokenizer's Jinja template rendered
        as transformers renders it for the hf backend; without a generation prompt the last message stays open
        (transformers' continue_final_message: the text ends with that message's content)."""
        from dyndepth.data.chat import TemplateChat
        from dyndepth.data.sources import DataError

        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("apply_chat_template needs the tokenizer's chat template (chat_template.jinja or "
                             "tokenizer_config.json's chat_template) and this tokenizer has none; evaluate without "
                             "apply_chat_template, or pass tokenizer=FOLDER of one that has it.")
        chat = TemplateChat(template, getattr(self.tokenizer, "bos_token", None),
                            getattr(self.tokenizer, "eos_token", None), clock=True)
        variables = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        try:
            text = chat.render(chat_history, add_generation_prompt, **variables)
        except DataError:  # as the hf backend: some templates refuse a system message
            log.warning("Failed to apply chat template. removing the system role in chat history.")
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = chat.render(chat_history, add_generation_prompt, **variables)
        if add_generation_prompt:
            return text
        last = chat_history[-1]["content"]  # cut what the template adds after it (end of turn), as transformers does
        if last.strip() not in text:
            raise ValueError("the chat template does not render the last message's text as it is, so it cannot be "
                             "continued; evaluate without apply_chat_template.")
        at = text.rindex(last.strip())
        keep = len(last.lstrip()) if text[at:at + len(last.lstrip())] == last else len(last.strip())
        return text[:at + keep]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's hf backend: special tokens unless `add_special_tokens` is False (or, not given, the string
        already starts with the prefix token's text); when on, BOS as `add_bos_token` says, else as the tokenizer's
        post-processor does (a Llama tokenizer prepends it: scores without it differed from the hf backend's)."""
        special = add_special_tokens is not False
        if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
            special = False
        ids = self.tokenizer.encode(string, add_bos=self.add_bos_token if special else False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        """Text of generated ids; ids past the tokenizer's vocabulary (padding rows of a larger embedding
        table, which an untrained model may still emit) have no text and are dropped."""
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size], skip_special=True)

    # ------------------------------------------------------------------------------ forwards
    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]], num_logits: int) -> torch.Tensor:
        """Left-padded forward of token rows -> log-probs of the last `num_logits` positions (B, n, V), fp32."""
        ids, mask = _left_pad(rows, self.eot_token_id, self.device)
        with self.knobs.scoring(self.model):
            out = self.model(ids, attention_mask=mask, num_logits=num_logits)
        self._record(out.stats)
        return F.log_softmax(out.logits.float(), dim=-1)  # (B, n, V)

    def _record(self, stats: dict) -> None:
        """Add a forward's scalar statistics, weighted by its valid tokens (`add_stats`)."""
        self._tokens += add_stats(self._stat_sums, stats)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.enable_thinking:  # (as the hf backend: a scored continuation has no thinking to cut)
            tasks = sorted({r.task_name for r in requests if getattr(r, "task_name", None)})
            raise ValueError(f"enable_thinking=true cannot score log-likelihoods (tasks {tasks}); evaluate them "
                             "without it, and generative tasks with it.")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context ids, continuation ids) -> (log p, is greedy)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not cont:  # lm-eval's split encodes context + continuation whole: GPT-2 BPE reads "1" + "23" as one
                    pair = f" {requests[i][0]!r}" if requests[i][0] is not None else ""  # token, all the context's
                    raise ValueError(f"the request{pair} has a continuation of 0 tokens: encoded together, its text "
                                     "merges into the context's last token, so nothing is left to score (lm-eval's hf "
                                     "backend stops on it too). Split that task's context and continuation at a token "
                                     "boundary (e.g. start the continuation with a space).")
                if len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored with max_length="
                                     f"{self.max_length}; it must have 1..max_length tokens.")
                ctx = ctx or [self.prefix_token_id]  # a context of spaces only: they moved to the continuation
                rows.append((ctx + cont)[-(self.max_length + 1):][:-1])  # the last token is only a target
                conts.append(cont)
            logp = self._logprobs(rows, max(map(len, conts)))  # (B, n, V)
            for b, i in enumerate(chunk):
                cont = torch.tensor(conts[b], device=logp.device)  # (C,)
                lp = logp[b, -len(conts[b]):]  # (C, V)
                check_finite(lp, self.model, "the log-probabilities of a scored continuation")  # (NaN scores: every
                # choice ties, and a multiple-choice task reports chance accuracy as a result)
                answer = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of max_length, each token predicted once."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(req.args[0]),
                                              prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                              context_len=1)
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if a task asks) KV-cached generation, batched per set of generation kwargs."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        encoded = [self.tok_encode(req.args[0]) for req in requests]
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            options = _generation_options(requests[members[0]].args[1], self.max_gen_toks,
                                          getattr(self.model, "generation_config", None))
            max_ctx = self.max_length - options["max_new_tokens"]
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={options['max_new_tokens']} leaves no room for the prompt within "
                                 f"max_length={self.max_length}; raise max_length or lower max_gen_toks.")
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                rows = [encoded[i][-max_ctx:] or [self.prefix_token_id] for i in chunk]
                for i, text in zip(chunk, self._generate(rows, options)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def check_decoding(self) -> None:
        """Enter the generation knobs once, as `generate_until` does: a budget whose thresholds are not calibrated
        fails here, before any request is scored (`dyndepth eval` calls this when a selected task generates)."""
        from dyndepth.generation import decoding_knobs

        kw = self.knobs.generate
        with self.knobs.decoding(self.model):
            if kw.get("skip_budget") is not None or kw.get("method_knobs"):
                with decoding_knobs(self.model, kw.get("skip_budget"), kw.get("method_knobs")):
                    pass

    @functools.cached_property
    def _stop_ids(self) -> list[int]:
        """EOS and the checkpoint's own end ids (generation_config.json's, else config.json's: Qwen3 ends at <|im_end|>
        and <|endoftext|>), as the hf backend's transformers generate stops; EOS alone ran on past the other one."""
        from dyndepth.generation import default_stop_tokens

        return list(dict.fromkeys([self.eot_token_id, *default_stop_tokens(self.model)]))

    def _generate(self, rows: list[list[int]], options: dict) -> list[str]:
        until, eot, stops = options["until"], self.eot_token_id, self._stop_ids
        cols: list[list[int]] = []  # one list of B tokens per generated step
        done = [False] * len(rows)

        def callback(_step: int, tokens_B: torch.Tensor) -> None:
            cols.append(tokens_B.tolist())
            for b in range(len(rows)):
                if not done[b]:
                    done[b] = cols[-1][b] in stops or (bool(until) and _cut(self.tok_decode(
                        [c[b] for c in cols]), until) is not None)
            if all(done):
                raise _AllStopped

        ids, mask = _left_pad(rows, eot, self.device)
        hook = self.model.register_forward_hook(lambda _m, _args, out: self._record(out.stats))  # prefill, steps
        try:
            with self.knobs.decoding(self.model), accounting(True):  # (generate keeps no ledger unless asked)
                self.model.generate(ids, options["max_new_tokens"], attention_mask=mask,
                                    temperature=options["temperature"], top_k=options["top_k"],
                                    top_p=options["top_p"], repetition_penalty=options["repetition_penalty"],
                                    stop_tokens=stops, pad_token_id=eot,
                                    callback=callback, **self.knobs.generate)
        except _AllStopped:
            pass
        finally:
            hook.remove()
        texts = []
        for b in range(len(rows)):
            tokens = [c[b] for c in cols]
            end = next((t for t, token in enumerate(tokens) if token in stops), len(tokens))
            tokens = tokens[:end]
            think = self.think_end_token
            if isinstance(think, int) and think in tokens:  # the answer follows the last one
                tokens = tokens[len(tokens) - tokens[::-1].index(think):]
            text = self.tok_decode(tokens)
            if think is not None:  # (stripped whether or not the thinking ended, as the hf backend does)
                text = (text.split(think)[-1] if isinstance(think, str) else text).lstrip()
            cut = _cut(text, until)
            texts.append(text if cut is None else text[:cut])
        return texts

    def get_model_info(self) -> dict:
        method = self.model.method
        stats = {k: v / max(self._tokens, 1.0) for k, v in self._stat_sums.items()}
        return {"dyndepth_method": method.to_dict() if method is not None else None,
                "method_knobs": dict(self.knobs.fields),  # (the generate arguments are the same values renamed)
                "scoring_lookahead": self._lookahead or None,  # None: each token's routing reads no later token
                "num_params": self.model.num_params(), "tokens_run": self._tokens, "per_token_stats": stats}


# ---------------------------------------------------------------------------------- helpers

def _generation_options(gen_kwargs: dict, default_max: int, generation_config: dict | None = None) -> dict:
    """A request's generation kwargs as the hf backend decodes them; `generation_config`: the checkpoint's
    generation_config.json, whose top_k / top_p a sampled request without its own takes, and whose
    repetition_penalty any request without its own takes, greedy too (as in transformers)."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"generation kwargs {unknown} are not supported by dyndepth; supported: {list(GEN_KWARGS)}.")
    if gen_kwargs.get("num_beams", 1) != 1:  # (1, one beam, is what transformers' generate does unless told otherwise)
        raise ValueError(f"generation kwarg num_beams={gen_kwargs['num_beams']}: beam search is not supported by "
                         "dyndepth, which decodes one beam (greedy or sampled); use num_beams=1.")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    # as lm-eval's normalize_gen_kwargs: without do_sample, a temperature > 0 samples (it decoded greedily here)
    do_sample = gen_kwargs.get("do_sample")
    sample = as_bool(do_sample) if do_sample is not None else float(gen_kwargs.get("temperature") or 0.0) > 0
    if sample and float(gen_kwargs.get("temperature") or 0.0) <= 0:
        # the hf backend passes a missing temperature as 0.0, which transformers' sampling rejects (this adapter
        # sampled at 1.0 without one and decoded greedily at 0.0)
        raise ValueError(f"generation kwargs do_sample=True with temperature={gen_kwargs.get('temperature')}: "
                         "sampling needs a temperature > 0 (lm-eval's hf backend fails on this too); give one, "
                         "e.g. --gen_kwargs temperature=0.7, or do_sample=False for greedy decoding.")
    config = generation_config or {}
    defaults = {k: default if config.get(k) is None else config[k] for k, default in SAMPLING_DEFAULTS.items()}
    return {"until": until,
            "max_new_tokens": int(next((gen_kwargs[k] for k in MAX_TOKENS if gen_kwargs.get(k) is not None),
                                       default_max)),
            "temperature": float(gen_kwargs["temperature"]) if sample else 0.0,
            "top_k": (gen_kwargs.get("top_k", defaults["top_k"]) or None) if sample else None,  # (0: no cut, as HF)
            "top_p": gen_kwargs.get("top_p", defaults["top_p"]) if sample else None,
            "repetition_penalty": float(gen_kwargs.get("repetition_penalty", config.get("repetition_penalty") or 1.0))}


def _cut(text: str, until: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in until) if i >= 0]
    return min(hits) if hits else None


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row):] = 1
    return ids.to(device), mask.to(device)
