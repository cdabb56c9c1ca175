"""checkpoint.pt: everything a resumed run needs to continue exactly as if never interrupted — model,
optimiser, lr and θ schedules, and every random generator (data order, augmentation, dropout)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..relaxation import ThetaScheduler


class CheckpointError(ValueError):
    """checkpoint.pt cannot be read (truncated, corrupt, not a checkpoint); one line naming the file."""


def atomic_save(obj, path: str):
    """torch.save through a temporary file and a rename: a crash (or an error) during the write leaves
    the previous file as it was and no temporary behind."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, model: nn.Module, optimizer, lr_schedule, theta: Optional[ThetaScheduler],
                    data_gen: torch.Generator, aug_gen: torch.Generator, scaler=None, **extra) -> None:
    """The training state plus ``extra`` (history, epoch, step, config), written atomically. scaler: the
    --amp fp16 grad scaler (its scale is state: a resumed run continues with it)."""
    atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(),
                     theta=theta.state_dict() if theta else None, data_gen=data_gen.get_state(),
                     aug_gen=aug_gen.get_state(), torch_rng=torch.get_rng_state(),
                     scaler=scaler.state_dict() if scaler is not None else None, **extra), path)


def load_checkpoint(path: str, device, model: nn.Module, optimizer, lr_schedule, theta: Optional[ThetaScheduler],
                    data_gen: torch.Generator, aug_gen: torch.Generator, scaler=None) -> tuple[list, int, int]:
    """Restore the training state in place; returns (history, epochs done, optimisation steps done)."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        keys = {"model", "optimizer", "lr_schedule", "theta", "data_gen", "aug_gen", "torch_rng", "history",
                "epoch", "step"}
        if not isinstance(ck, dict) or not keys <= set(ck):
            raise ValueError("not a relaxeq-train checkpoint")
    except Exception as e:  # torch.load raises many kinds (zip, pickle, EOF, runtime) for a broken file
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "it is truncated or corrupt — the run directory was left as it is") from None
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    lr_schedule.load_state_dict(ck["lr_schedule"])
    if theta is not None:
        theta.load_state_dict(ck["theta"])
    data_gen.set_state(ck["data_gen"])
    aug_gen.set_state(ck["aug_gen"])
    torch.set_rng_state(ck["torch_rng"])
    if scaler is not None and ck.get("scaler") is not None:
        scaler.load_state_dict(ck["scaler"])
    return ck["history"], ck["epoch"], ck["step"]
