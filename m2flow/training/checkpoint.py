"""HF-format checkpoints: safetensors weights + config.json + tokenizer, loadable by plain `transformers`.

Writes go to a temporary directory that is renamed into place, so a checkpoint directory is either
complete or absent: a crash while saving never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import save_file


class NonFiniteWeightsError(ValueError):
    """A checkpoint would hold NaN or infinite weights."""


def save_hf_checkpoint(path: str, hf_config, state_dict: dict[str, torch.Tensor], tokenizer=None) -> str:
    """Saves `state_dict` (full, unsharded) with `hf_config` and `tokenizer` as an HF model directory. Refuses
    (NonFiniteWeightsError, nothing written) if any weight is NaN or infinite."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to save checkpoint {path}: {len(bad)} tensor(s) hold NaN or infinite weights, e.g. {bad[0]}; "
            f"the update diverged (lower train.lr, check train.grad_clip); earlier checkpoints are untouched")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied to the embedding; transformers re-ties on load
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_hf_model(path: str, dtype: str = "float32"):
    """(model, tokenizer) from an HF model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"not an HF model directory (no config.json): {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
