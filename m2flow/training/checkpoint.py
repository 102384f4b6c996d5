"""HF-format checkpoints: safetensors weights + config.json + tokenizer, loadable by plain `transformers`;
and a trainer's resumable state beside them (trainer_state.pt: optimizer, LR schedule, RNG).

Writes go to a temporary directory that is renamed into place, so a checkpoint directory is either
complete or absent: a crash while saving never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from m2flow.training.actor import full_state_dict
from m2flow.training.data_parallel import world

WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"


class NonFiniteWeightsError(ValueError):
    """A checkpoint would hold NaN or infinite weights."""


def save_hf_checkpoint(path: str, hf_config, state_dict: dict[str, torch.Tensor], tokenizer=None) -> str:
    """Saves `state_dict` (full, unsharded) with `hf_config` and `tokenizer` as an HF model directory. Refuses
    (NonFiniteWeightsError, nothing written) if any weight is NaN or infinite."""
    check_finite(path, state_dict)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_files(tmp, hf_config, state_dict, tokenizer)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_finite(path: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raises NonFiniteWeightsError (naming `path`, the checkpoint that would have held them) if any weight is
    NaN or infinite."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to save checkpoint {path}: {len(bad)} tensor(s) hold NaN or infinite weights, e.g. {bad[0]}; "
            f"the update diverged (lower train.lr, check train.grad_clip); earlier checkpoints are untouched")


def write_hf_files(path: str, hf_config, state_dict: dict[str, torch.Tensor], tokenizer=None) -> None:
    """model.safetensors, config.json and the tokenizer files into directory `path` (created; not atomic: callers
    write into a temporary directory and rename it)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied to the embedding; transformers re-ties on load
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    hf_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_weights_into(model: torch.nn.Module, path: str) -> None:
    """Loads `path`/model.safetensors (written by write_hf_files) into `model` in place, sharded or not; a
    tied lm_head is re-tied to the embedding. Every weight of the model must be in the file."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, WEIGHTS))
    expected = model.state_dict().keys()
    if "lm_head.weight" in expected and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{os.path.join(path, WEIGHTS)} lacks {len(missing)} weight(s) of the model, e.g. {missing[0]}")
    if dist.is_initialized() and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(tensors)


def save_trainer_state(path: str, model: torch.nn.Module, optimizer, scheduler, extra: dict) -> None:
    """`path`/trainer_state.pt: the optimizer state (full, unsharded, on CPU), the LR schedule, this process's
    torch RNG state and `extra` (plain values), everything an exact resume of the trainer needs besides the
    weights."""
    if dist.is_initialized() and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim = optimizer.state_dict()
    if world()[0] != 0:  # the gathers above are collective; rank 0 holds the full state and writes it
        return
    state = {"optimizer": optim, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
             "extra": extra}
    torch.save(state, os.path.join(path, TRAINER_STATE))


def load_trainer_state(path: str, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restores what save_trainer_state wrote (optimizer, LR schedule, torch RNG); returns its `extra`."""
    file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing: {path} holds weights only (a final checkpoint, or one written "
                                f"before m2flow saved trainer state), so training cannot resume from it exactly")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if dist.is_initialized() and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["extra"]


def save_trainer(path: str, trainer, tokenizer=None) -> None:
    """A trainer's (the actor's or the critic's: `model`, `optimizer`, `scheduler`, `bad_steps_in_a_row`)
    resumable state into directory `path`: its weights as an HF checkpoint (with `tokenizer`) and
    trainer_state.pt. Refuses non-finite weights."""
    weights = full_state_dict(trainer.model)  # collective on N ranks: rank 0 gets the weights
    if world()[0] == 0:
        check_finite(path, weights)
        write_hf_files(path, trainer.model.config, weights, tokenizer)
    save_trainer_state(path, trainer.model, trainer.optimizer, trainer.scheduler,
                       {"bad_steps_in_a_row": trainer.bad_steps_in_a_row})


def load_trainer(path: str, trainer) -> None:
    """Restores what save_trainer wrote into `trainer`: weights, optimizer, LR schedule, RNG, bad-step count."""
    load_weights_into(trainer.model, path)
    extra = load_trainer_state(path, trainer.model, trainer.optimizer, trainer.scheduler)
    trainer.bad_steps_in_a_row = int(extra["bad_steps_in_a_row"])


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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
