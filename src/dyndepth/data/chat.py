"""Chat records as (prompt, response) text: plain `role: content` lines, or the tokenizer's own template.

`data.chat_template` chooses:
- "auto" (default): the tokenizer's chat template when it has one (`tokenizer_config.json`'s
  `chat_template` or `chat_template.jinja`, as Qwen3 ships), else "plain";
- "tokenizer": the tokenizer's template, and an error when it has none;
- "plain": `role: content` lines (`sources.render_chat`), whatever the model.

A template is rendered the way `transformers`' `apply_chat_template` does (a sandboxed Jinja2
environment with `trim_blocks`, `lstrip_blocks`, `raise_exception` and a JSON `tojson`). The prompt is
the conversation before the last assistant message with `add_generation_prompt=True`; the trained
response is what the full conversation adds to it (for Qwen3, the empty `<think></think>` block, the
answer and `<|im_end|>`). With a template, `{"prompt", "response"}` records become one user turn and one
assistant turn, so SFT pairs are formatted as the model saw chats in post-training.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

from dyndepth.data.sources import ChatTemplate, DataError, render_chat

CHAT_MODES = ("auto", "tokenizer", "plain")


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """transformers' `tojson` filter (Jinja's own escapes HTML): a template's compact or sorted tool schemas render
    as they do there."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateChat:
    """A Jinja chat template as a `ChatTemplate`: `messages -> (prompt, response)`."""

    renders_pairs = True  # prompt/response records are rendered as a user and an assistant turn

    def __init__(self, template: str, bos_token: str | None = None, eos_token: str | None = None,
                 clock: bool = False) -> None:
        try:
            from jinja2 import nodes
            from jinja2.ext import Extension
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise DataError("the tokenizer's chat template needs jinja2 to render: pip install jinja2, or set "
                            "data.chat_template='plain'.") from None

        def raise_exception(message: str):
            raise DataError(f"the chat template refused the conversation: {message}")

        class Generation(Extension):  # transformers' {% generation %} (assistant-mask) tag: renders its body
            tags = frozenset({"generation"})

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", Generation])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = raise_exception
        if clock:  # transformers' strftime_now: Llama 3.2's template prints today's date with it (else a fixed one);
            # off for training data, whose shards are cached by the template's text, not the day
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(template)
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool, **variables) -> str:
        """`variables`: more template variables, as transformers' apply_chat_template takes them (enable_thinking)."""
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.special, **variables)  # as transformers
        except TemplateError as e:  # e.g. a template that reads messages[0] of a chat the assistant opens
            raise DataError(f"the chat template could not render these messages: {type(e).__name__}: {e}") from None

    def __call__(self, messages: Sequence[dict]) -> tuple[str, str]:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise DataError("chat record has no message with role 'assistant' to train on")
        prompt = self.render(messages[:last], add_generation_prompt=True)
        full = self.render(messages[: last + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template renders the conversation differently from its "
                            "generation prompt, so the trained answer cannot be cut out; set "
                            "data.chat_template='plain'.")
        return prompt, full[len(prompt):]


def chat_renderer(mode: str, tokenizer) -> ChatTemplate:
    """The `ChatTemplate` for `data.chat_template=mode` with `tokenizer`."""
    if mode not in CHAT_MODES:
        raise DataError(f"data.chat_template={mode!r} is not one of {CHAT_MODES}.")
    template = getattr(tokenizer, "chat_template", None)
    if mode == "plain" or (mode == "auto" and not template):
        return render_chat
    if not template:
        raise DataError("data.chat_template='tokenizer' but the tokenizer has no chat template "
                        "(tokenizer_config.json 'chat_template' or chat_template.jinja); use 'auto' or 'plain'.")
    return TemplateChat(template, getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))


def chat_fingerprint(mode: str, tokenizer) -> str:
    """What the rendering depends on, for cache keys: the mode and the template text in use ("single-eos":
    shards built since a turn ending in EOS stopped getting a second one), and the BOS / EOS texts a template
    may render: they come from tokenizer_config.json, which the tokenizer's own fingerprint does not read."""
    renderer = chat_renderer(mode, tokenizer)
    if renderer is render_chat:
        return "plain"
    return "template,single-eos:" + json.dumps([renderer.special, getattr(tokenizer, "chat_template", "")])
