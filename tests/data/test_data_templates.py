from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from m2flow.data.templates import TEMPLATES, format_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|pad|>"]
    vocab = {tok: i for i, tok in enumerate(specials + pre_tokenizers.ByteLevel.alphabet())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = chat_template
    return tok


def test_chat_template_applied():
    tok = tiny_tokenizer(CHAT_TEMPLATE)
    assert format_prompt("What is 2+2?", tok) == "<|user|>What is 2+2?<|end|><|assistant|>"
    assert format_prompt("What is 2+2?", tok, template="chat") == "<|user|>What is 2+2?<|end|><|assistant|>"


def test_chat_falls_back_to_plain_without_chat_template():
    tok = tiny_tokenizer(None)
    assert format_prompt("What is 2+2?", tok, template="chat") == "What is 2+2?\n"


def test_plain_ignores_chat_template():
    tok = tiny_tokenizer(CHAT_TEMPLATE)
    assert format_prompt("What is 2+2?", tok, template="plain") == "What is 2+2?\n"


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer(CHAT_TEMPLATE)
    text = format_prompt("Ünïcode 3×4?", tok)
    assert tok.decode(tok(text)["input_ids"]) == text


def test_unknown_template_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'; valid templates: chat, plain"):
        format_prompt("q", tiny_tokenizer(), template="alpaca")
    assert TEMPLATES == ("chat", "plain")
