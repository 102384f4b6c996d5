"""`model.path` as a local HF model directory or a Hugging Face Hub id (`owner/name`).

A Hub id is resolved once, where the run starts, to the local directory of its snapshot in the Hugging Face
cache (`huggingface_hub.snapshot_download`: downloaded the first time, reused after), so everything downstream
(trainer, rollout engine, checkpoints) reads a local directory.
"""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # owner/name
WEIGHT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # no .bin/.pth copies


class ModelPathError(ValueError):
    """model.path names neither a local model directory nor a Hub model that could be fetched."""


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not an existing local path (a local directory always wins)."""
    return bool(HUB_ID.match(path)) and not os.path.exists(path)


def resolve_model_path(path: str) -> str:
    """A local directory for `path`: itself, or for a Hub id its snapshot directory (fetched if not cached).
    "" stays "" (the tiny base model). A Hub id that cannot be fetched (no network, HF_HUB_OFFLINE=1 and not
    cached, unknown or gated repository) raises ModelPathError naming it."""
    if not path or not is_hub_id(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=WEIGHT_FILES)
    except Exception as e:  # noqa: BLE001 (offline, not found, gated, network: one message for all)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelPathError(
            f"model.path {path!r} is not a local directory, and as a Hugging Face Hub id it could not be fetched "
            f"({type(e).__name__}: {reason}); download it first (`hf download {path}`, then it is found in the "
            f"Hugging Face cache) or set model.path to a local HF model directory") from None
