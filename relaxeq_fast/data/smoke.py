"""The rotation smoke-plume set (Wang, Walters & Yu, ICML 2022; the relaxation paper's ``2DFlow/``), simulated
here with PhiFlow (optional extra ``[flow]``).

Physics, as the public generator (``2DFlow/data_gen.ipynb``, "Rotation"): a closed square box of ``grid``
cells (zero normal velocity at the walls), a smoke inflow sphere of radius 5 at the middle of one side, set
``radius`` cells in from that wall, adding smoke at rate 1 every step, and buoyancy pointing inward from that
side. Simulation k = 1..36 uses side j = (k − 1) mod 4 (bottom, right, top, left: each the previous one turned
by 90° counter-clockwise) and buoyancy magnitude k × (0.01, 0.01, 0.011, 0.01)[j] per unit smoke: the 0.011
on the top side is the deliberate break of the 90° symmetry. Each step (dt = 1):

    smoke    ← MacCormack advection of the smoke by the velocity + the inflow
    velocity ← semi-Lagrangian self-advection + buoyancy (smoke × force, resampled to the staggered grid)
    velocity ← pressure projection (divergence-free; CG to relative tolerance 1e-5, float64)

All simulations run at once, along a PhiFlow batch dimension. A sample is the velocity at the cell centres:
two channels (v_x, v_y) with x to the right and y up, stored as an image (row 0 is the top row), so that
``torch.rot90(f, 1, dims=(-2, -1))`` with (v_x, v_y) ↦ (−v_y, v_x) is the field turned by 90°
counter-clockwise (:func:`rotate_fields`). The public generator stores the staggered face values cropped to
64 × 64 instead (each component half a cell off the centre, so a 90° turn of its arrays is not a 90° turn of
the flow); centring the samples is our one change to the data.

Splits, as the public code (``run_model.py``): 25 training simulations and 10 test-domain simulations (never
trained on; k = 32 is unused), listed in :data:`TRAIN_SIMS` / :data:`DOMAIN_SIMS`. Frames are the saved steps
after the first (the public code drops frame 0). A window starting at s takes frames s + 2 … s + 11 as input
(10 frames, as the public code's offset of 2) and the next ``horizon`` frames as target. Window starts: train
[0, 160), validation [160, 200), test-future [200, 250) (training simulations), test-domain [0, 100).
Horizons: 6 for training and validation, 20 for both test sets (predicted autoregressively).

Presets (:data:`PRESETS`): "paper" (64 × 64, 36 simulations, 310 steps; ~5 min to simulate on 2 cores),
"small" (the same simulations at 64 × 64, averaged to 32 × 32, with every split's window starts thinned
by ``stride`` for the CPU study), "tiny" (32 × 32, 8 simulations, 60 steps; seconds: tests and the demo).

    data = load_smoke("tiny")            # SmokeData(train, val, test_future, test_domain)
    x, y = data.train.x[0:4], data.train.y[0:4]     # [4, 10, 2, H, W], [4, 6, 2, H, W]

Simulated on first use and cached under ``cache_dir`` (default ``~/.cache/relaxeq_fast/smoke``), written
atomically and keyed by every simulation parameter (the window settings are applied on load).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["SmokeSpec", "PRESETS", "SIDES", "SIDE_FACTORS", "TRAIN_SIMS", "DOMAIN_SIMS", "check_spec", "side_of",
           "buoyancy", "inflow_center", "rotate_fields", "simulate", "cache_path", "simulated_frames", "FrameWindows",
           "WindowedSplit", "SmokeData", "windows", "load_smoke"]

SIDES = ("bottom", "right", "top", "left")
SIDE_FACTORS = (0.01, 0.01, 0.011, 0.01)
# the public code's lists (run_model.py): simulation k of side (k - 1) % 4
TRAIN_SIMS = (27, 33, 3, 28, 9, 12, 22, 8, 30, 25, 16, 11, 23, 29, 36, 26, 1, 35, 19, 34, 4, 2, 7, 31, 17)
DOMAIN_SIMS = (6, 14, 15, 10, 18, 20, 24, 13, 21, 5)
INPUT_OFFSET = 2  # the public code's window takes frames s + 2 ... as input


@dataclass(frozen=True)
class SmokeSpec:
    """Every parameter of the set. Simulation: grid, n_sims (k = 1..n_sims), steps, radius, side_factors,
    downsample (average pooling of the saved fields, exact under 90° turns). Windows: [start, stop) of each
    split's window starts, stride between starts, input frames and horizons."""
    grid: int = 64
    n_sims: int = 36
    steps: int = 310
    radius: float = 5.0
    side_factors: tuple = SIDE_FACTORS
    downsample: int = 1
    train_starts: tuple = (0, 160)
    val_starts: tuple = (160, 200)
    future_starts: tuple = (200, 250)
    domain_starts: tuple = (0, 100)
    stride: int = 1
    input_frames: int = 10
    train_horizon: int = 6
    eval_horizon: int = 20

    @property
    def frames(self) -> int:
        """Saved frames per simulation (the first step's result is dropped, as the public code)."""
        return self.steps - 1

    @property
    def size(self) -> int:
        """The side of a sample's grid."""
        return self.grid // self.downsample

    def simulation_key(self) -> dict:
        """What the simulated frames depend on (the cache key)."""
        return dict(grid=self.grid, n_sims=self.n_sims, steps=self.steps, radius=self.radius,
                    side_factors=list(self.side_factors), downsample=self.downsample, version=1)


PRESETS = {
    "paper": SmokeSpec(),
    "small": SmokeSpec(downsample=2, stride=4),
    "tiny": SmokeSpec(grid=32, n_sims=8, steps=60, train_starts=(0, 12), val_starts=(12, 18),
                      future_starts=(18, 27), domain_starts=(0, 27), stride=1),
}


def check_spec(spec: SmokeSpec) -> None:
    """ValueError (one line, naming the parameter) for a set that cannot be simulated or windowed."""
    for name in ("grid", "n_sims", "steps", "downsample", "stride", "input_frames", "train_horizon", "eval_horizon"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"smoke: {name} must be a positive int, got {v!r}")
    if spec.n_sims > 36:
        raise ValueError(f"smoke: n_sims must be at most 36 (the published simulations), got {spec.n_sims}")
    if not 0 < spec.radius < spec.grid / 2:
        raise ValueError(f"smoke: radius must be in (0, grid / 2 = {spec.grid / 2:g}), got {spec.radius!r}")
    if spec.grid % spec.downsample:
        raise ValueError(f"smoke: downsample {spec.downsample} must divide grid {spec.grid}")
    if len(spec.side_factors) != 4 or not all(f > 0 for f in spec.side_factors):
        raise ValueError(f"smoke: side_factors must be 4 positive numbers (bottom, right, top, left), "
                         f"got {spec.side_factors!r}")
    for name, horizon in (("train_starts", spec.train_horizon), ("val_starts", spec.train_horizon),
                          ("future_starts", spec.eval_horizon), ("domain_starts", spec.eval_horizon)):
        start, stop = getattr(spec, name)
        need = stop - 1 + INPUT_OFFSET + spec.input_frames + horizon
        if not 0 <= start < stop:
            raise ValueError(f"smoke: {name} must be [start, stop) with 0 <= start < stop, got {(start, stop)}")
        if need > spec.frames:
            raise ValueError(f"smoke: {name} {(start, stop)} needs {need} frames per simulation "
                             f"(input {spec.input_frames}, horizon {horizon}); steps = {spec.steps} give {spec.frames}")
    if not [k for k in TRAIN_SIMS if k <= spec.n_sims] or not [k for k in DOMAIN_SIMS if k <= spec.n_sims]:
        raise ValueError(f"smoke: n_sims = {spec.n_sims} leaves no training or no test-domain simulation "
                         f"(the first test-domain one is k = {min(DOMAIN_SIMS)})")


def side_of(k: int) -> int:
    """The side index j (0 bottom, 1 right, 2 top, 3 left) of simulation k = 1..36."""
    return (k - 1) % 4


def buoyancy(k: int, side_factors: Sequence[float] = SIDE_FACTORS) -> tuple[float, float]:
    """The buoyancy force per unit smoke (f_x, f_y) of simulation k: magnitude k·side_factors[j], inward."""
    j = side_of(k)
    m = k * side_factors[j]
    return ((0.0, m), (-m, 0.0), (0.0, -m), (m, 0.0))[j]


def inflow_center(j: int, grid: int, radius: float) -> tuple[float, float]:
    """The inflow sphere's centre (x, y), y up, for side j: the middle of that side, ``radius`` in from the wall."""
    mid = grid / 2
    return ((mid, radius), (grid - radius, mid), (mid, grid - radius), (radius, mid))[j]


def rotate_fields(f: torch.Tensor, quarter_turns: int = 1) -> torch.Tensor:
    """Velocity fields f [..., 2, H, W] (image layout of the module docstring) turned by quarter_turns × 90°
    counter-clockwise: the grid turned and the vectors with it."""
    out = f
    for _ in range(quarter_turns % 4):
        out = torch.rot90(out, 1, dims=(-2, -1))
        out = torch.stack((-out[..., 1, :, :], out[..., 0, :, :]), dim=-3)
    return out


def simulate(sims: Sequence[int], grid: int = 64, steps: int = 310, radius: float = 5.0,
             side_factors: Sequence[float] = SIDE_FACTORS, forces: Optional[Sequence[tuple]] = None,
             progress: bool = True, record_divergence: bool = False):
    """Simulate the plumes of ``sims`` (k values) at once (float64, PhiFlow's NumPy backend).

    forces: (f_x, f_y) per simulation instead of :func:`buoyancy` (tests use equal magnitudes on every side).
    Returns frames float64 [S, steps, 2, grid, grid] (every step's centred velocity, image layout; frame 0 is
    kept here: :func:`load_smoke` drops it); with ``record_divergence`` also [S, steps, 2] = max |∇·u| on the
    grid before and after each step's pressure projection.
    """
    from .._deps import require
    require("phi")
    from phi import flow
    from ..progress import progress as progress_bar

    flow.math.set_global_precision(64)  # PhiFlow 3's pressure solve needs float64 to converge
    sims = list(sims)
    if not sims:
        raise ValueError("simulate: sims must name at least one simulation")
    sides = [side_of(k) for k in sims]
    forces = list(forces) if forces is not None else [buoyancy(k, side_factors) for k in sims]
    if len(forces) != len(sims):
        raise ValueError(f"simulate: forces must have one (f_x, f_y) per simulation ({len(sims)}), got {len(forces)}")
    vec = flow.channel(vector="x,y")
    centers = flow.tensor([inflow_center(j, grid, radius) for j in sides], flow.batch("sim"), vec)
    force = flow.tensor([list(f) for f in forces], flow.batch("sim"), vec)
    bounds = flow.Box(x=grid, y=grid)
    smoke = flow.CenteredGrid(0, flow.extrapolation.BOUNDARY, x=grid, y=grid, bounds=bounds)
    velocity = flow.StaggeredGrid(0, flow.extrapolation.ZERO, x=grid, y=grid, bounds=bounds)
    inflow = flow.resample(flow.Sphere(center=centers, radius=radius), to=smoke, soft=True)
    # CG on the singular Neumann system as it is (rank_deficiency=0: PhiFlow's default adds a constraint row
    # and falls back to a direct solve, ~5x slower); the absolute tolerance lets a zero right-hand side converge
    solve = flow.Solve("CG", 1e-5, 1e-12, rank_deficiency=0)
    frames, divergence = [], []
    bar = progress_bar(range(steps), desc=f"simulating {len(sims)} smoke plumes ({grid}x{grid})",
                       log_every=30.0) if progress else range(steps)
    for _ in bar:
        smoke = flow.advect.mac_cormack(smoke, velocity, dt=1) + inflow
        velocity = flow.advect.semi_lagrangian(velocity, velocity, dt=1) + flow.resample(smoke * force, to=velocity)
        if record_divergence:
            before = flow.field.divergence(velocity).values.numpy("sim,y,x")
        velocity, _pressure = flow.fluid.make_incompressible(velocity, (), solve)
        if record_divergence:
            after = flow.field.divergence(velocity).values.numpy("sim,y,x")
            divergence.append(torch.stack([torch.from_numpy(abs(d).max((1, 2))) for d in (before, after)], 1))
        centred = torch.from_numpy(velocity.at_centers().values.numpy("sim,vector,y,x"))
        frames.append(centred.flip(-2))  # y up → row 0 at the top
    if progress:
        bar.close()
    out = torch.stack(frames, 1)
    if record_divergence:
        return out, torch.stack(divergence, 1)
    return out


def cache_path(spec: SmokeSpec, cache_dir: Optional[str] = None) -> str:
    """Where :func:`load_smoke` keeps the frames of ``spec``: a file named by every simulation parameter."""
    cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "relaxeq_fast", "smoke"))
    key = hashlib.sha256(json.dumps(spec.simulation_key(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"smoke{spec.size}_{key}.pt")


def simulated_frames(spec: SmokeSpec, cache_dir: Optional[str] = None, progress: bool = True) -> torch.Tensor:
    """Frames float32 [n_sims, spec.frames, 2, size, size] of simulations k = 1..n_sims (row k − 1), from the
    cache or simulated (then cached atomically: a concurrent reader sees the whole file or none)."""
    check_spec(spec)
    path = cache_path(spec, cache_dir)
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    frames = simulate(range(1, spec.n_sims + 1), spec.grid, spec.steps, spec.radius, spec.side_factors,
                      progress=progress)[:, 1:]
    if spec.downsample > 1:
        s, t = frames.shape[:2]
        frames = F.avg_pool2d(frames.flatten(0, 1), spec.downsample).unflatten(0, (s, t))
    frames = frames.float().contiguous()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(frames, tmp)
    os.replace(tmp, path)
    return frames


class FrameWindows:
    """One side (inputs or targets) of a windowed split, indexed like a tensor without materialising it:
    ``w[idx]`` → [n, length, 2, H, W] for an index tensor, list, slice or int (then [length, 2, H, W]).

    frames [S, T, 2, H, W]; window i reads frames[sim[i], start[i] + offset : start[i] + offset + length].
    """

    def __init__(self, frames: torch.Tensor, sim: torch.Tensor, start: torch.Tensor, offset: int, length: int):
        self.frames, self.sim, self.start, self.offset, self.length = frames, sim, start, offset, length
        self._steps = torch.arange(length)

    def __len__(self) -> int:
        return len(self.sim)

    @property
    def shape(self) -> tuple:
        """(windows, length, 2, H, W)."""
        return (len(self), self.length, *self.frames.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        """The frames' dtype."""
        return self.frames.dtype

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, int):
            return self[torch.tensor([idx])][0]
        sim, start = self.sim[idx], self.start[idx]
        t = start[:, None] + self.offset + self._steps
        return self.frames[sim[:, None], t]

    def to(self, dtype: torch.dtype) -> "FrameWindows":
        """The same windows over frames cast to ``dtype``."""
        return FrameWindows(self.frames.to(dtype), self.sim, self.start, self.offset, self.length)

    def subset(self, idx: torch.Tensor) -> "FrameWindows":
        """Windows ``idx`` (an index tensor) of these, over the same frames."""
        return FrameWindows(self.frames, self.sim[idx], self.start[idx], self.offset, self.length)


class WindowedSplit(NamedTuple):
    """One split: x (inputs [N, input_frames, 2, H, W]) and y (targets [N, horizon, 2, H, W]) as
    :class:`FrameWindows`; class_names is empty (regression)."""
    x: FrameWindows
    y: FrameWindows
    class_names: list

    def to(self, dtype: torch.dtype) -> "WindowedSplit":
        """The same windows over frames cast to ``dtype``."""
        return WindowedSplit(self.x.to(dtype), self.y.to(dtype), [])

    def subset(self, idx: torch.Tensor) -> "WindowedSplit":
        """Windows ``idx`` (an index tensor) of this split."""
        return WindowedSplit(self.x.subset(idx), self.y.subset(idx), [])


class SmokeData(NamedTuple):
    """The four splits: training, validation and test-future windows of the training simulations, test-domain
    windows of the test-domain simulations."""
    train: WindowedSplit
    val: WindowedSplit
    test_future: WindowedSplit
    test_domain: WindowedSplit


def windows(frames: torch.Tensor, rows: Sequence[int], starts: tuple, stride: int, input_frames: int,
            horizon: int) -> WindowedSplit:
    """Every window of simulations ``rows`` (rows of ``frames``) with a start in range(*starts, stride)."""
    begin = torch.arange(starts[0], starts[1], stride)
    sim = torch.tensor(list(rows)).repeat_interleave(len(begin))
    start = begin.repeat(len(rows))
    return WindowedSplit(FrameWindows(frames, sim, start, INPUT_OFFSET, input_frames),
                         FrameWindows(frames, sim, start, INPUT_OFFSET + input_frames, horizon), [])


def load_smoke(spec: "SmokeSpec | str" = "tiny", cache_dir: Optional[str] = None, progress: bool = True,
               **overrides) -> SmokeData:
    """The four splits of the smoke-plume set of ``spec`` (a :class:`SmokeSpec` or a preset name, with field
    ``overrides``): training, validation and test-future windows from the training simulations, test-domain
    windows from the test-domain simulations (module docstring)."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"smoke: preset must be one of {sorted(PRESETS)}, got {spec!r}")
        spec = PRESETS[spec]
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SmokeSpec)})
    if unknown:
        raise ValueError(f"smoke: unknown parameter(s) {unknown}")
    spec = dataclasses.replace(spec, **overrides)
    frames = simulated_frames(spec, cache_dir, progress)
    train_rows = [k - 1 for k in TRAIN_SIMS if k <= spec.n_sims]
    domain_rows = [k - 1 for k in DOMAIN_SIMS if k <= spec.n_sims]
    w = lambda rows, starts, horizon: windows(frames, rows, starts, spec.stride, spec.input_frames, horizon)  # noqa: E731
    return SmokeData(w(train_rows, spec.train_starts, spec.train_horizon),
                     w(train_rows, spec.val_starts, spec.train_horizon),
                     w(train_rows, spec.future_starts, spec.eval_horizon),
                     w(domain_rows, spec.domain_starts, spec.eval_horizon))
