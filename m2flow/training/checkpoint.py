"""HF-format checkpoints: safetensors weights + config.json + tokenizer, loadable by plain `transformers`;
and a trainer's resumable state beside them (trainer_dcp/: the weights and the optimizer state as each rank's
shards, through torch.distributed.checkpoint, loadable on any number of ranks; trainer_state.pt: LR schedule,
RNG).

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
SHARDED = "trainer_dcp"  # the trainer's weights and optimizer state, as torch.distributed.checkpoint shards


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


def save_trainer_state(path: str, model: torch.nn.Module, optimizer, lr_schedule, extra: dict) -> None:
    """Everything an exact resume of the trainer needs, into directory `path`: the weights and the optimizer state
    sharded as they are, through torch.distributed.checkpoint (`trainer_dcp/`: every rank writes its own shards,
    nothing is gathered), and, from rank 0, trainer_state.pt with the LR schedule, the torch RNG state and `extra`
    (plain values). Called by every rank of the trainer's group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(path, SHARDED),
             no_dist=not dist.is_initialized())
    if world()[0] == 0:
        torch.save({"lr_schedule": lr_schedule.state_dict(), "torch_rng": torch.get_rng_state(), "extra": extra},
                   os.path.join(path, TRAINER_STATE))


def load_trainer_state(path: str, model: torch.nn.Module, optimizer, lr_schedule) -> dict:
    """Restores what save_trainer_state wrote (weights, optimizer, LR schedule, torch RNG); returns its `extra`.
    The shards are laid out anew for this trainer's ranks, so a run may resume on another number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    file, sharded = os.path.join(path, TRAINER_STATE), os.path.join(path, SHARDED)
    if not (os.path.isfile(file) and os.path.isdir(sharded)):
        raise FileNotFoundError(f"{file} or {sharded} is missing: {path} holds weights only (a final checkpoint, or "
                                f"one written before m2flow saved trainer state), so training cannot resume from it "
                                f"exactly")
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into (optimizer initialised)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=sharded, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    saved = torch.load(file, map_location="cpu", weights_only=True)
    lr_schedule.load_state_dict(saved["lr_schedule"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["extra"]


def save_trainer(path: str, trainer, tokenizer=None) -> None:
    """A trainer's (the actor's or the critic's: `model`, `optimizer`, `lr_schedule`, `bad_steps_in_a_row`)
    resumable state into directory `path`: its weights as an HF checkpoint (with `tokenizer`) and
    trainer_state.pt. Refuses non-finite weights."""
    weights = full_state_dict(trainer.model)  # collective on N ranks: rank 0 gets the weights
    if world()[0] == 0:
        check_finite(path, weights)
        write_hf_files(path, trainer.model.config, weights, tokenizer)
    save_trainer_state(path, trainer.model, trainer.optimizer, trainer.lr_schedule,
                       {"bad_steps_in_a_row": trainer.bad_steps_in_a_row})


def load_trainer(path: str, trainer) -> None:
    """Restores what save_trainer wrote into `trainer`: weights, optimizer, LR schedule, RNG, bad-step count."""
    extra = load_trainer_state(path, trainer.model, trainer.optimizer, trainer.lr_schedule)
    trainer.bad_steps_in_a_row = int(extra["bad_steps_in_a_row"])


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
