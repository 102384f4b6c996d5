"""Prompt templates: how a problem's question becomes the text the model is prompted with."""

from __future__ import annotations

from typing import Any

TEMPLATES = ("chat", "plain")


def format_prompt(question: str, tokenizer: Any, template: str = "chat") -> str:
    """`chat`: the tokenizer's chat template (a user turn plus the generation prompt), or `plain` when the
    tokenizer has none; `plain`: the question followed by a newline."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid templates: {', '.join(TEMPLATES)}")
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return question + "\n"
