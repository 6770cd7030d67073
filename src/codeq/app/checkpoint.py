"""Checkpoints: written atomically, loaded with ``weights_only=True`` (no arbitrary unpickling).

A checkpoint holds only tensors and plain Python types: model (latent weights and quantizer
parameters), optimizer, scheduler, progress counters, the resolved config, every random number
generator state and the W&B run id, enough for a resumed run to continue bit for bit.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from codeq.errors import CheckpointError
from codeq.io import atomic_write

CHECKPOINT_FORMAT = 1
# A run directory's checkpoints: the latest (what --resume continues) and the best by validation accuracy.
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"
REQUIRED_KEYS = ("format", "model", "optimizer", "scheduler", "epoch", "epoch_step", "config", "rng")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` with ``torch.save`` through ``atomic_write``: a crash or a full disk mid-write leaves the
    previous checkpoint untouched."""
    atomic_write(path, lambda file: torch.save(state, file))


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint ``path`` names: the file itself, or a run directory's ``last.pt``."""
    path = Path(path)
    return path / LAST_CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by this trainer; anything else raises CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing .pt file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); "
                              f"resume from another checkpoint or start a new run") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a CoDeQ-train checkpoint (no {', '.join(missing)}); "
                              f"resume from a last.pt or best.pt written by run_training.py")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}, this trainer reads format "
                              f"{CHECKPOINT_FORMAT}; resume it with the version that wrote it")
    return state


def load_model_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load weights into ``model``, turning a shape or name mismatch into a CheckpointError."""
    mine, theirs = model.state_dict(), state
    missing = [key for key in mine if key not in theirs]
    unexpected = [key for key in theirs if key not in mine]
    reshaped = [key for key in mine if key in theirs and mine[key].shape != theirs[key].shape]
    if missing or unexpected or reshaped:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped)) if keys)
        raise CheckpointError(f"checkpoint {path} holds a different model ({detail}); "
                              f"resume it with the config that wrote it")
    model.load_state_dict(state)


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every random number generator a run draws from, as tensors and plain types."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                           "pos": int(numpy_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Put every generator back where ``rng_state`` found it (CUDA only when both runs had GPUs)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_generator.set_state(state["loader"])
