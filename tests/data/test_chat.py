import json

import pytest

from dyndepth.data.build import build_loader
from dyndepth.data.chat import TemplateChat, chat_renderer
from dyndepth.data.shards import encode_document
from dyndepth.data.sources import DataError, Document, iter_documents, render_chat
from dyndepth.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

# The shape of Qwen3's template: <|im_start|>role\ncontent<|im_end|>\n per message, a generation prompt
# "<|im_start|>assistant\n", and an empty think block before the final answer.
QWEN_LIKE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


def _qwen_like_tokenizer(folder):
    tok = train_bpe(iter(["be brief 2+2? 4 system user assistant think"] * 10), vocab_size=300,
                    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = QWEN_LIKE
    tok.save(folder)
    return load_tokenizer(folder)  # the template comes back from tokenizer_config.json


def test_tokenizer_template_renders_prompt_and_trained_answer(tmp_path):
    tok = _qwen_like_tokenizer(tmp_path / "tok")
    assert tok.chat_template == QWEN_LIKE
    prompt, response = chat_renderer("auto", tok)(MESSAGES)
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "<think>\n\n</think>\n\n4<|im_end|>\n"
    assert chat_renderer("plain", tok) is render_chat
    assert chat_renderer("auto", ByteTokenizer()) is render_chat  # no template: plain lines


def test_jsonl_sft_through_the_loader_uses_the_template(tmp_path):
    tok = _qwen_like_tokenizer(tmp_path / "tok")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    docs = list(iter_documents(data, chat_template=chat_renderer("auto", tok)))
    assert docs[1] == Document(text="<think>\n\n</think>\n\n4<|im_end|>\n",
                               prompt="<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    cfg = {"source": str(data), "tokenizer": str(tmp_path / "tok"), "cache_dir": str(tmp_path / "cache"),
           "val_source": str(data)}  # data.chat_template defaults to "auto": the tokenizer's template
    shards = build_loader(cfg, split="val", batch_size=1, seq_len=8, seed=0).shards
    end = int(shards.doc_starts()[1])
    ids, mask = shards.tokens(0, end), shards.loss_mask(0, end)
    assert tok.decode(ids[mask == 0], skip_special=False) == docs[0].prompt  # not "system: be brief\n..."
    assert tok.decode(ids[mask == 1], skip_special=False) == docs[0].text + "<|endoftext|>"


def test_template_errors_are_clear():
    chat = TemplateChat("{{ raise_exception('no system role') }}")
    with pytest.raises(DataError, match="refused the conversation: no system role"):
        chat(MESSAGES)
    with pytest.raises(DataError, match="assistant"):
        TemplateChat(QWEN_LIKE)([{"role": "user", "content": "hi"}])
    odd = TemplateChat("{% if add_generation_prompt %}GEN{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match="chat_template='plain'"):
        odd(MESSAGES)


def test_generation_blocks_render_their_content():
    # transformers' {% generation %} tag (marks assistant tokens for return_assistant_tokens_mask) raised a raw
    # jinja2 TemplateSyntaxError "Encountered unknown tag 'generation'" when the template was loaded
    marked = QWEN_LIKE.replace("' + message.content + '<|im_end|>\\n' }}{%- else %}",
                               "' }}{% generation %}{{- message.content + '<|im_end|>\\n' }}{% endgeneration %}"
                               "{%- else %}", 1)
    assert marked != QWEN_LIKE
    assert TemplateChat(marked)(MESSAGES) == TemplateChat(QWEN_LIKE)(MESSAGES)


def test_tools_and_documents_are_none_as_in_transformers():
    # transformers renders with tools=None, documents=None; left undefined, `tools is not none` was true and this
    # rendered "tools: 0\nuser: hi\n..." where transformers renders "user: hi\n..."
    chat = TemplateChat("{% if tools is not none %}tools: {{ tools | length }}\n{% endif %}"
                        "{% if documents is not none %}docs\n{% endif %}"
                        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    assert chat(MESSAGES[1:]) == ("user: 2+2?\nassistant: ", "4\n")


def test_a_turn_that_ends_in_eos_gets_no_second_one(tmp_path):
    # Qwen3's chat models name <|im_end|> their EOS, and the template closes every turn with it: the appended EOS
    # made each trained answer end "<|im_end|>\n<|im_end|>", a pattern the model never produced
    tok = _qwen_like_tokenizer(tmp_path / "tok")
    tok = HFTokenizer(tok.backend, eos_token="<|im_end|>", chat_template=QWEN_LIKE)
    prompt, response = chat_renderer("auto", tok)(MESSAGES)
    ids, mask = encode_document(Document(text=response, prompt=prompt), tok)
    assert tok.decode(ids[mask == 1], skip_special=False) == response  # not response + "<|im_end|>"
    assert list(ids).count(tok.eos_token_id) == 3  # one per turn
    plain_ids, _ = encode_document(Document(text="4"), tok)  # a text without one still gets it
    assert plain_ids[-1] == tok.eos_token_id and tok.decode(plain_ids[:-1]) == "4"
    inside, _ = encode_document(Document(text="a<|im_end|> and more"), tok)  # EOS inside a text: one added
    assert inside[-1] == tok.eos_token_id and list(inside).count(tok.eos_token_id) == 2


def test_a_template_rendering_bos_rebuilds_when_the_bos_token_changes(tmp_path):
    # the shard cache key held the template text and tokenizer.json, not the BOS / EOS names of
    # tokenizer_config.json that `{{ bos_token }}` renders: a changed bos_token reused the old shards
    tok = _qwen_like_tokenizer(tmp_path / "tok")
    tok.chat_template = "{{ bos_token }}" + QWEN_LIKE
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    firsts = []
    for bos in ("<|im_start|>", "<|im_end|>"):
        tok.bos_token = bos
        tok.save(tmp_path / "tok")
        cfg = {"source": str(data), "tokenizer": str(tmp_path / "tok"), "cache_dir": str(tmp_path / "cache"),
               "val_source": str(data)}
        shards = build_loader(cfg, split="val", batch_size=1, seq_len=8, seed=0).shards
        firsts.append(tok.decode(shards.tokens(0, 1), skip_special=False))
    assert firsts == ["<|im_start|>", "<|im_end|>"]


def test_tojson_takes_the_options_transformers_gives_it():
    # sort_keys and separators were dropped (tool schemas rendered with other bytes than transformers' template)
    import transformers.utils.chat_template_utils as hf_chat

    template = ("{{ messages[0].content | tojson(separators=(',', ':'), sort_keys=true) }}|"
                "{{ messages[0].content | tojson(ensure_ascii=true) }}")
    messages = [{"role": "user", "content": {"b": "é", "a": [1, 2]}}, {"role": "assistant", "content": "ok"}]
    ours = TemplateChat(template).render(messages[:1], add_generation_prompt=False)
    theirs = hf_chat.render_jinja_template(conversations=[messages[:1]], chat_template=template)[0][0]
    assert ours == theirs == '{"a":[1,2],"b":"é"}|{"b": "\\u00e9", "a": [1, 2]}'
