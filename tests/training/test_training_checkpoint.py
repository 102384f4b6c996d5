"""HF checkpoints: loadable by plain transformers in a fresh process, atomic replace, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from m2flow.training.checkpoint import load_hf_model, save_hf_checkpoint

NEW_TOKENS = 8
QUESTION = "Compute 12+7*3."

# Runs in a fresh interpreter: only torch + transformers, never m2flow.
RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    path, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": %r}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=%d, pad_token_id=tok.pad_token_id)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    assert "m2flow" not in sys.modules, sorted(m for m in sys.modules if m.startswith("m2flow"))
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    print(json.dumps({"prompt_ids": ids, "new_ids": gen[0, len(ids):].tolist(), "tied": tied,
                      "eos": tok.eos_token_id, "pad": tok.pad_token_id, "cls": type(model).__name__}))
    """
) % (QUESTION, NEW_TOKENS)


@pytest.fixture(scope="module")
def model(make_micro_model):
    return make_micro_model(0).eval()


def _save(path, model, tokenizer):
    return save_hf_checkpoint(str(path), model.config, model.state_dict(), tokenizer)


def test_checkpoint_reloads_in_plain_transformers(tmp_path, model, tokenizer):
    ckpt = tmp_path / "ckpt"
    assert _save(ckpt, model, tokenizer) == str(ckpt)
    files = set(os.listdir(ckpt))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files

    # the weights on disk are the model's (lm_head is tied to the embedding, so it is stored once)
    saved = load_file(str(ckpt / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) - {"lm_head.weight"}
    for k, v in saved.items():
        assert torch.equal(v, state[k]), k

    reloaded_path = tmp_path / "reloaded.pt"
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(ckpt), str(reloaded_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    # same prompt ids, same greedy continuation as the in-process model
    messages = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got["prompt_ids"] == ids
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
        )
    assert got["new_ids"] == gen[0, len(ids):].tolist()
    assert len(got["new_ids"]) >= 1
    assert got["tied"] is True
    assert (got["eos"], got["pad"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert got["cls"] == "Qwen2ForCausalLM"

    # the reloaded weights equal the saved ones, lm_head (re-tied) included
    reloaded = torch.load(reloaded_path, weights_only=True)
    assert set(reloaded) == set(state)
    for k, v in state.items():
        assert torch.equal(reloaded[k], v), k


def test_load_hf_model_roundtrip(tmp_path, model, tokenizer):
    ckpt = _save(tmp_path / "ckpt", model, tokenizer)
    loaded, tok = load_hf_model(ckpt)
    assert tok.padding_side == "left" and tok.pad_token_id == tokenizer.pad_token_id
    state = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_saving_twice_replaces_and_leaves_no_temporaries(tmp_path, make_micro_model, tokenizer):
    ckpt = tmp_path / "ckpt"
    first, second = make_micro_model(0), make_micro_model(1)
    _save(ckpt, first, tokenizer)
    (ckpt / "stale.txt").write_text("from the first save")
    _save(ckpt, second, tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no ckpt.tmp / ckpt.old left behind
    assert not (ckpt / "stale.txt").exists()  # replaced, not merged
    saved = load_file(str(ckpt / "model.safetensors"))
    want = second.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in saved.items())
    assert not torch.equal(saved["model.embed_tokens.weight"], first.state_dict()["model.embed_tokens.weight"])


def test_save_with_trailing_slash(tmp_path, model, tokenizer):
    path = str(tmp_path / "ckpt") + "/"
    save_hf_checkpoint(path, model.config, model.state_dict(), tokenizer)
    save_hf_checkpoint(path, model.config, model.state_dict(), tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert os.path.isfile(tmp_path / "ckpt" / "config.json")


def test_save_without_tokenizer(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(str(ckpt), model.config, model.state_dict())
    assert {"config.json", "model.safetensors"} <= set(os.listdir(ckpt))
    assert not (ckpt / "tokenizer.json").exists()


def test_load_without_config_raises(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_model"):
        load_hf_model(str(empty))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_hf_model(str(tmp_path / "missing_dir"))
