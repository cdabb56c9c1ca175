"""checkpoint.pt: everything a resumed run needs to continue exactly as if never interrupted — model,
optimiser, lr and θ schedules, and every random generator (data order, augmentation, dropout)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..relaxation import ThetaScheduler


def atomic_save(obj, path: str):
    """torch.save through a temporary file and a rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str, model: nn.Module, optimizer, lr_schedule, theta: Optional[ThetaScheduler],
                    data_gen: torch.Generator, aug_gen: torch.Generator, **extra) -> None:
    """The training state plus ``extra`` (history, epoch, step, config), written atomically."""
    atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(),
                     theta=theta.state_dict() if theta else None, data_gen=data_gen.get_state(),
                     aug_gen=aug_gen.get_state(), torch_rng=torch.get_rng_state(), **extra), path)


def load_checkpoint(path: str, device, model: nn.Module, optimizer, lr_schedule, theta: Optional[ThetaScheduler],
                    data_gen: torch.Generator, aug_gen: torch.Generator) -> tuple[list, int, int]:
    """Restore the training state in place; returns (history, epochs done, optimisation steps done)."""
    ck = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    lr_schedule.load_state_dict(ck["lr_schedule"])
    if theta is not None:
        theta.load_state_dict(ck["theta"])
    data_gen.set_state(ck["data_gen"])
    aug_gen.set_state(ck["aug_gen"])
    torch.set_rng_state(ck["torch_rng"])
    return ck["history"], ck["epoch"], ck["step"]
