"""The local byte-level tokenizer: stable vocab across processes, exact round trips, chat template,
and a save / AutoTokenizer reload next to a Qwen2 config."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from m2flow.data.tokenizer import END, PAD_TOKEN, ROLE_TOKENS, build_tokenizer

USER = ROLE_TOKENS["user"]

TEXTS = [
    "Compute (12+3)*4-5.",
    "Ann has 3 apples and buys 4 more.\n3+4=7\n\\boxed{7}",
    "  leading and  double  spaces, trailing \n\n\t tab ",
    "\\frac{1}{2} + \\sqrt{x^2} = {a_1}",
    string.printable,
]

VOCAB_SCRIPT = (
    "import json, sys\n"
    "from m2flow.data.tokenizer import build_tokenizer\n"
    "print(json.dumps(sorted(build_tokenizer().get_vocab().items())))\n"
)


def test_vocab_is_identical_across_processes_and_hash_seeds(tokenizer):
    vocabs = []
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", VOCAB_SCRIPT], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        vocabs.append(dict(json.loads(proc.stdout.strip().splitlines()[-1])))
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert vocabs[0] == tokenizer.get_vocab()


def test_vocab_layout(tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == len(vocab) == 5 + 256
    assert [vocab[t] for t in (PAD_TOKEN, END, USER)] == [0, 1, 3]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "left"
    assert sorted(vocab.values()) == list(range(len(vocab)))


@pytest.mark.parametrize("text", TEXTS)
def test_ascii_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: digits are single tokens
    assert tokenizer.decode(ids) == text


def test_digits_are_single_distinct_tokens(tokenizer):
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in "0123456789"]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 10
    assert tokenizer("1234", add_special_tokens=False)["input_ids"] == [i[0] for i in ids[1:5]]


def test_special_tokens_are_single_tokens(tokenizer):
    ids = tokenizer(f"{USER}user\nhi{END}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(USER) and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 1 + len("user\nhi") + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
    no_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_gen == text[: -len("<|assistant|>")]
    full = messages + [{"role": "assistant", "content": "\\boxed{4}"}]
    assert tokenizer.apply_chat_template(full, tokenize=False).endswith("<|assistant|>\\boxed{4}<|end|>")


def test_build_tokenizer_twice_is_identical(tokenizer):
    other = build_tokenizer()
    assert other.get_vocab() == tokenizer.get_vocab()
    assert other.chat_template == tokenizer.chat_template


def test_save_and_autotokenizer_reload_next_to_qwen2_config(tmp_path, tokenizer, make_micro_model):
    make_micro_model(0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    for text in TEXTS + [f"{USER}7*8=?{END}"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids, text
        assert loaded.decode(ids) == tokenizer.decode(ids) == text
        assert loaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Compute 3*4."}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
