"""What a run is made of: the model, the datasets (the test set rotated once), batch augmentation."""
from __future__ import annotations

import torch
from torch import nn

from .config import (DEPTH_MODELS, FLOW_MODELS, GRAPH_MODELS, IMAGE_MODELS, ConfigError, TrainConfig, _augmentations,
                     _fail)


def augment_batch(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """A training batch (x, y) as the model sees it: N-body systems rotated with their targets (each by its
    own rotation, ``cfg.train_rotation``); point clouds and images as :func:`_augment_batch`."""
    if cfg.model in GRAPH_MODELS:
        return _rotate_nbody(x, y, cfg.train_rotation, gen)
    if cfg.model in FLOW_MODELS:  # the smoke plumes are never rotated (validate insists)
        return x, y
    return _augment_batch(x, cfg, gen), y


def _rotate_nbody(x: torch.Tensor, y: torch.Tensor, rotation: str, gen: torch.Generator):
    from ..data import augment
    from .task import move_nbody
    if rotation == "aligned":
        return x, y
    R = augment.random_rotations(len(x), rotation, generator=gen, dtype=x.dtype)
    return move_nbody(x, y, R, x.new_zeros(3))


def _augment_batch(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """``cfg.augment`` (the public code's loader: before the rotation), the rotation, then
    ``cfg.augment_rotated`` (its training loop: after the rotation); each list in the fixed order
    dropout, scale, shift, jitter.

    Before the rotation, scale is anisotropic (each axis U[2/3, 3/2)) and shift U[-0.2, 0.2) per
    coordinate; after it, scale is isotropic (U[0.8, 1.25)) and shift U[-0.1, 0.1).

    Point dropout duplicates points exactly; at a point whose k neighbours are all its copies every
    VN feature is rank 1, and VN batch norm then multiplies sideways changes — which only the relaxed
    branch can make — by |BN|/(‖x‖ + ε), up to ~1e6: the relaxed weights' task gradient explodes.
    Jitter applied after the dropout removes the exact duplicates; --clip-grad-norm bounds the step.
    """
    from ..data import augment
    if cfg.model in IMAGE_MODELS:
        return _rotate_images(x, cfg.train_rotation, gen)
    # the loader's (per-axis scale, larger shift), the rotation, then the training loop's
    x = _apply_augmentations(x, cfg.augment, gen, scale=augment.anisotropic_scale, max_shift=0.2)
    x = augment.rotate(x, cfg.train_rotation, generator=gen)
    return _apply_augmentations(x, cfg.augment_rotated, gen, scale=augment.isotropic_scale, max_shift=0.1)


def _apply_augmentations(x: torch.Tensor, spec, gen: torch.Generator, scale, max_shift: float) -> torch.Tensor:
    """The augmentations named in ``spec``, always in the order dropout, scale, shift, jitter."""
    from ..data import augment
    chosen = set(_augmentations(spec))
    if "dropout" in chosen:
        x = augment.point_dropout(x, generator=gen)
    if "scale" in chosen:
        x = scale(x, generator=gen)
    if "shift" in chosen:
        x = augment.shift(x, max_shift=max_shift, generator=gen)
    if "jitter" in chosen:
        x = augment.jitter(x, generator=gen)
    return x


def _rotate_images(x: torch.Tensor, rotation: str, gen: torch.Generator) -> torch.Tensor:
    """The image rotation protocol: aligned → unchanged; z, so3 → each image by its own angle ~ U[0, 2π)."""
    from ..data import augment
    return x if rotation == "aligned" else augment.random_rotate_images(x, generator=gen)


# the published N-body models' hidden width (EGNN's 64 features, SEGNN's 64 weight-balanced); their depth (4, and
# the SE(3)-Transformer's 2) is config.DEPTH_MODELS, --layers changes it
GRAPH_HIDDEN = 64
# the SE(3)-Transformer's at width 1: 16 channels per degree, 2 heads (its pairwise kernels cost ~100× an EGNN
# layer's on the CPU: a size a CPU run can afford, not the published one)
SE3T_HIDDEN, SE3T_HEADS = 16, 2


def build_model(cfg: TrainConfig, num_classes: int = 0) -> nn.Module:
    """The model of ``cfg.model``, relaxed unless ``cfg.plain``: a classifier with ``num_classes`` outputs,
    (egnn, segnn) an N-body position predictor of width round(64 · cfg.width), 4 layers, (se3_transformer) of
    2 · round(8 · cfg.width) channels per degree, 2 blocks, or (cnn, equiv, rsteer)
    a smoke-plume forecaster of round(92 · cfg.width) hidden C_N regular fields (cnn: as many channels)."""
    from ..models import VNDGCNN, SteerableCNN, VNPointNet
    relax_kwargs = dict(relax_init=cfg.relax_init, theta=cfg.theta_max, backend=cfg.backend,
                        relax_space=cfg.relax_space)
    conv_relax_kwargs = dict(relax_kwargs, track_defect=cfg.defect == "data")
    if cfg.model in FLOW_MODELS:
        from ..data.smoke import PRESETS
        from ..models import ConvForecaster, SteerableForecaster
        from ..models.smoke import PUBLISHED_HIDDEN
        frames = PRESETS[cfg.smoke_preset].input_frames
        if cfg.model == "cnn":
            return ConvForecaster(frames, hidden_channels=PUBLISHED_HIDDEN * cfg.group, width=cfg.width)
        return SteerableForecaster(frames, group=cfg.group, width=cfg.width, rsteer=cfg.model == "rsteer",
                                   alpha=cfg.rsteer_alpha, relaxed=not cfg.plain, relax_kwargs=conv_relax_kwargs)
    if cfg.model in GRAPH_MODELS:
        from .. import models
        hidden = max(1, round(GRAPH_HIDDEN * cfg.width))
        layers = cfg.layers or DEPTH_MODELS[cfg.model]
        if cfg.model == "egnn":
            return models.EGNN(hidden=hidden, n_layers=layers, relaxed=not cfg.plain, norm_diff=cfg.norm_diff,
                               **relax_kwargs)
        if cfg.model == "se3_transformer":
            per_head = max(1, round(SE3T_HIDDEN / SE3T_HEADS * cfg.width))
            return models.SE3TransformerNBody(hidden=SE3T_HEADS * per_head, n_layers=layers, heads=SE3T_HEADS,
                                              relaxed=not cfg.plain, **relax_kwargs)
        return models.SEGNN(hidden_features=hidden, n_layers=layers, relaxed=not cfg.plain, **relax_kwargs)
    if cfg.model == "steerable_cnn":
        return SteerableCNN(num_classes=num_classes, group=cfg.group, relaxed=not cfg.plain, width=cfg.width,
                            dropout=cfg.dropout, relax_kwargs=conv_relax_kwargs)
    cls = {"vn_pointnet": VNPointNet, "vn_dgcnn": VNDGCNN}[cfg.model]
    return cls(num_classes=num_classes, k=cfg.k, relaxed=not cfg.plain, relax_kwargs=relax_kwargs,
               dropout=cfg.dropout, width=cfg.width, relaxed_maps=cfg.relaxed_maps)


def _load_data(cfg: TrainConfig):
    """(train, validation or None, test, {name: another test split}): the validation split is the last
    ``val_fraction`` of a seeded permutation of the training data; validation and test sets are rotated once, by
    seeded rotations (every epoch sees the same sets), with --test-rotation. Only the smoke forecasts have
    another test split (test-domain)."""
    from ..data import load_dataset
    if cfg.model in GRAPH_MODELS:
        return (*_load_nbody(cfg), {})
    if cfg.model in FLOW_MODELS:
        return _load_smoke(cfg)
    try:
        train, test = load_dataset(cfg.dataset, cfg.data_root, num_points=cfg.num_points, seed=cfg.seed,
                                   n_train=cfg.n_train, n_test=cfg.n_test)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{cfg.dataset}: {str(e).splitlines()[0]}") from e
    val = None
    n_val = round(cfg.val_fraction * len(train.y))
    if n_val:
        perm = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(cfg.seed + 104729))
        keep, held = perm[:len(train.y) - n_val], perm[len(train.y) - n_val:]
        val = train._replace(x=train.x[held], y=train.y[held])
        train = train._replace(x=train.x[keep], y=train.y[keep])
    if cfg.batch_size > len(train.y):
        _fail(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train.y)} samples"
              + (f" after --val-fraction {cfg.val_fraction}" if n_val else "") + ")")
    dtype = getattr(torch, cfg.dtype)
    val = None if val is None else _rotate_once(val, cfg, dtype, seed=cfg.seed + 7907)
    return train._replace(x=train.x.to(dtype)), val, _rotate_once(test, cfg, dtype, seed=cfg.seed + 7919), {}


def _rotate_once(data, cfg: TrainConfig, dtype, seed: int):
    from ..data import augment
    gen = torch.Generator().manual_seed(seed)
    if cfg.model in IMAGE_MODELS:
        x = _rotate_images(data.x.to(dtype), cfg.test_rotation, gen)
    else:
        x = augment.rotate(data.x.to(dtype), cfg.test_rotation, generator=gen)
    return data._replace(x=x.contiguous())


def _load_nbody(cfg: TrainConfig):
    """The charged N-body splits (:func:`relaxeq_fast.data.load_nbody`, data seed 0 for every run: one fixed
    benchmark, as the published one; --seed seeds the model and the training only) as packed
    ``LabeledData``: x [N, 5, 7] (positions, velocities, charges), y [N, 5, 3]. --n-train takes the first
    n training systems, --n-test the first n validation and test systems. With --test-rotation z or so3 the
    validation and test systems are rotated once (each by its own seeded rotation, targets with them)."""
    from ..data import LabeledData, load_nbody
    from .task import pack_nbody
    try:
        splits = load_nbody(seed=0, n_train=cfg.n_train, n_val=cfg.n_test, n_test=cfg.n_test,
                            cache_dir=cfg.data_root)
    except ValueError as e:
        raise ConfigError(f"{cfg.dataset}: {str(e).splitlines()[0]}") from e
    dtype = getattr(torch, cfg.dtype)
    train, val, test = (LabeledData(pack_nbody(s.loc, s.vel, s.charges).to(dtype), s.target.to(dtype), [])
                        for s in splits)
    if cfg.batch_size > len(train.y):
        _fail(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train.y)} systems)")
    moved = []
    for split, seed in ((val, cfg.seed + 7907), (test, cfg.seed + 7919)):
        x, y = _rotate_nbody(split.x, split.y, cfg.test_rotation, torch.Generator().manual_seed(seed))
        moved.append(split._replace(x=x.contiguous(), y=y.contiguous()))
    return train, moved[0], moved[1]


def _load_smoke(cfg: TrainConfig):
    """The smoke-plume windows of ``--smoke-preset`` (:func:`relaxeq_fast.data.smoke.load_smoke`; simulated once
    and cached under --data-root, default ~/.cache/relaxeq_fast/smoke): (train, validation, test-future) and
    {"test_domain": the test-domain windows}. --n-train / --n-test take the first n windows of the training /
    of each evaluation split (validation and both test splits) in a seeded order shared by every run."""
    from ..data.smoke import load_smoke
    try:
        data = load_smoke(cfg.smoke_preset, cache_dir=cfg.data_root, progress=cfg.progress)
    except ValueError as e:
        raise ConfigError(f"{cfg.dataset}: {str(e).splitlines()[0]}") from e
    dtype = getattr(torch, cfg.dtype)
    splits = []
    for split, n, flag in ((data.train, cfg.n_train, "--n-train"), (data.val, cfg.n_test, "--n-test"),
                           (data.test_future, cfg.n_test, "--n-test"), (data.test_domain, cfg.n_test, "--n-test")):
        if n is not None:
            if not 1 <= n <= len(split.y):
                _fail(f"{flag} {n} must be between 1 and the {len(split.y)} windows of that split")
            pick = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(104729))[:n].sort().values
            split = split.subset(pick)
        splits.append(split.to(dtype))
    train, val, future, domain = splits
    if cfg.batch_size > len(train.y):
        _fail(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train.y)} windows)")
    return train, val, future, {"test_domain": domain}
