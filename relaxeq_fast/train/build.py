"""What a run is made of: the model, the datasets (the test set rotated once), batch augmentation."""
from __future__ import annotations

import torch
from torch import nn

from .config import IMAGE_MODELS, ConfigError, TrainConfig, _augmentations, _fail

def _augment_batch(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The listed augmentations in a fixed order (dropout, scale, shift, jitter), then the rotation.

    Point dropout duplicates points exactly; at a point whose k neighbours are all its copies every
    VN feature is rank 1, and VN batch norm then multiplies sideways changes — which only the relaxed
    branch can make — by |BN|/(‖x‖ + ε), up to ~1e6: the relaxed weights' task gradient explodes.
    Jitter applied after the dropout removes the exact duplicates; --clip-grad-norm bounds the step.
    """
    from ..data import augment
    if cfg.model in IMAGE_MODELS:
        return _rotate_images(x, cfg.train_rotation, gen)
    chosen = set(_augmentations(cfg))
    if "dropout" in chosen:
        x = augment.point_dropout(x, generator=gen)
    if "scale" in chosen:
        x = augment.anisotropic_scale(x, generator=gen)
    if "shift" in chosen:
        x = augment.shift(x, generator=gen)
    if "jitter" in chosen:
        x = augment.jitter(x, generator=gen)
    return augment.rotate(x, cfg.train_rotation, generator=gen)


def _rotate_images(x: torch.Tensor, rotation: str, gen: torch.Generator) -> torch.Tensor:
    """The image rotation protocol: aligned → unchanged; z, so3 → each image by its own angle ~ U[0, 2π)."""
    from ..data import augment
    return x if rotation == "aligned" else augment.random_rotate_images(x, generator=gen)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The classifier of ``cfg.model``, relaxed unless ``cfg.plain``."""
    from ..models import VNDGCNN, SteerableCNN, VNPointNet
    relax_kwargs = dict(relax_init=cfg.relax_init, theta=cfg.theta_max, backend=cfg.backend)
    if cfg.model == "steerable_cnn":
        return SteerableCNN(num_classes=num_classes, group=cfg.group, relaxed=not cfg.plain, width=cfg.width,
                            dropout=cfg.dropout, relax_kwargs=relax_kwargs)
    cls = {"vn_pointnet": VNPointNet, "vn_dgcnn": VNDGCNN}[cfg.model]
    return cls(num_classes=num_classes, k=cfg.k, relaxed=not cfg.plain, relax_kwargs=relax_kwargs,
               dropout=cfg.dropout, width=cfg.width)


def _load_data(cfg: TrainConfig):
    from ..data import augment, load_dataset
    try:
        train, test = load_dataset(cfg.dataset, cfg.data_root, num_points=cfg.num_points, seed=cfg.seed,
                                   n_train=cfg.n_train, n_test=cfg.n_test)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{cfg.dataset}: {str(e).splitlines()[0]}") from e
    if cfg.batch_size > len(train.y):
        _fail(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train.y)} samples)")
    # the test set is rotated once, by rotations fixed by the seed: every epoch sees the same test set
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model in IMAGE_MODELS:
        test_x = _rotate_images(test.x.to(dtype), cfg.test_rotation, gen)
    else:
        test_x = augment.rotate(test.x.to(dtype), cfg.test_rotation, generator=gen)
    return train._replace(x=train.x.to(dtype)), test._replace(x=test_x.contiguous())
