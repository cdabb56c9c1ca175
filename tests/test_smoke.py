"""The smoke-plume data (relaxeq_fast.data.smoke): the PhiFlow simulation (divergence-free, deterministic, its
90° symmetry exact with equal buoyancy on every side and broken by the 0.011 side), the cache, the windows and
splits against explicit slicing, and one-line errors for bad parameters."""
import dataclasses
import os

import pytest
import torch

pytest.importorskip("phi", reason="the smoke plumes are simulated with PhiFlow: pip install 'relaxeq_fast[flow]'")

from relaxeq_fast.data import smoke as S  # noqa: E402

GRID, STEPS, RADIUS, M = 16, 20, 3.0, 0.05
INWARD = [(0.0, M), (-M, 0.0), (0.0, -M), (M, 0.0)]  # bottom, right, top, left, equal magnitudes
BROKEN = INWARD[:2] + [(0.0, -1.1 * M)] + INWARD[3:]  # the published top side: 1.1 × the others


@pytest.fixture(scope="module")
def simulated():
    """Sides 0..3 with equal magnitudes, then the same with the top side 10 % stronger, in one batch."""
    frames, div = S.simulate([1, 2, 3, 4] * 2, grid=GRID, steps=STEPS, radius=RADIUS, forces=INWARD + BROKEN,
                             progress=False, record_divergence=True)
    return frames, div


def test_pressure_projection_leaves_the_velocity_divergence_free(simulated):
    _frames, div = simulated
    before, after = div[..., 0], div[..., 1]
    print(f"max |div u| before {before.max():.3g}, after {after.max():.3g}, worst ratio {(after / before).max():.3g}")
    # the CG solve stops at a residual of 1e-5 relative to its right-hand side (the divergence before)
    assert (before > 1e-3).all()  # the buoyancy really makes divergence every step
    assert (after <= 1e-5 * before + 1e-12).all()


def test_simulation_is_deterministic(simulated):
    frames, _ = simulated
    again = S.simulate([1, 2], grid=GRID, steps=STEPS, radius=RADIUS, forces=INWARD[:2], progress=False)
    assert torch.equal(again, frames[:2])


def test_next_side_is_the_previous_side_turned_by_90_degrees_unless_the_top_is_stronger(simulated):
    frames, _ = simulated
    equal, broken = frames[:4], frames[4:]
    scale = lambda f: f.norm().item()  # noqa: E731
    errs = [(S.rotate_fields(equal[j]) - equal[(j + 1) % 4]).norm().item() / scale(equal[j]) for j in range(4)]
    broken_errs = [(S.rotate_fields(broken[j]) - broken[j + 1]).norm().item() / scale(broken[j]) for j in (1, 2)]
    print("relative differences, equal sides:", errs, "with the stronger top:", broken_errs)
    # The discrete scheme commutes with quarter turns (MacCormack / semi-Lagrangian on a square staggered grid,
    # a symmetric Laplacian, a sphere's sampled volume, centred samples): what is left is rounding inside each
    # step's CG solve, which stops at a relative residual of 1e-5, hence that bound (measured ~1e-7).
    assert max(errs) < 1e-5
    # the stronger top side's buoyancy: 10 % more force, several % of the whole field (measured ~0.08)
    assert min(broken_errs) > 1e-2
    # the field is not trivially symmetric (a zero field would pass the first check)
    assert scale(equal[0]) > 1.0


def test_rotate_fields_is_a_rotation():
    f = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(S.rotate_fields(f, 4), f)
    assert torch.equal(S.rotate_fields(S.rotate_fields(f, 1), 3), f)
    # a uniform flow to the right turns into a uniform flow upwards
    right = torch.zeros(2, 4, 4, dtype=torch.float64)
    right[0] = 1.0
    up = S.rotate_fields(right)
    assert torch.equal(up[0], torch.zeros(4, 4)) and torch.equal(up[1], torch.ones(4, 4, dtype=torch.float64))
    # a field that points right on the right half (columns 2, 3) points up on the top half (rows 0, 1) after the turn
    g = torch.zeros(2, 4, 4, dtype=torch.float64)
    g[0, :, 2:] = 1.0
    h = S.rotate_fields(g)
    assert torch.equal(h[1, :2], torch.ones(2, 4, dtype=torch.float64)) and h[1, 2:].abs().sum() == 0


def test_buoyancy_and_inflow_follow_the_published_layout():
    # simulation k uses side (k - 1) % 4 and magnitude k × (0.01, 0.01, 0.011, 0.01)[side], pointing inward
    assert S.buoyancy(1) == (0.0, 0.01)
    assert S.buoyancy(2) == (-0.02, 0.0)
    assert S.buoyancy(3) == pytest.approx((0.0, -0.033))
    assert S.buoyancy(36) == pytest.approx((0.36, 0.0))
    assert [S.inflow_center(j, 64, 5) for j in range(4)] == [(32, 5), (59, 32), (32, 59), (5, 32)]
    assert set(S.TRAIN_SIMS).isdisjoint(S.DOMAIN_SIMS) and len(S.TRAIN_SIMS) == 25 and len(S.DOMAIN_SIMS) == 10
    assert set(S.TRAIN_SIMS) | set(S.DOMAIN_SIMS) == set(range(1, 37)) - {32}


def test_cache_is_reused_and_keyed_by_the_simulation(smoke_cache, monkeypatch):
    spec = S.PRESETS["tiny"]
    path = S.cache_path(spec, smoke_cache)
    assert os.path.isfile(path) and not [f for f in os.listdir(smoke_cache) if ".tmp" in f]
    monkeypatch.setattr(S, "simulate", lambda *a, **k: pytest.fail("simulated again instead of reading the cache"))
    frames = S.simulated_frames(spec, smoke_cache)
    assert frames.shape == (8, 59, 2, 32, 32) and frames.dtype == torch.float32
    # window settings do not change the cached frames; simulation settings do
    assert S.cache_path(dataclasses.replace(spec, stride=3), smoke_cache) == path
    for change in (dict(grid=16), dict(steps=61), dict(radius=4.0), dict(downsample=2), dict(n_sims=7),
                   dict(side_factors=(0.01,) * 4)):
        assert S.cache_path(dataclasses.replace(spec, **change), smoke_cache) != path, change


def test_windows_and_splits_are_the_public_codes(smoke_cache):
    spec = S.PRESETS["tiny"]
    frames = S.simulated_frames(spec, smoke_cache)
    data = S.load_smoke("tiny", cache_dir=smoke_cache, progress=False)
    train_rows = [k - 1 for k in S.TRAIN_SIMS if k <= 8]
    domain_rows = [k - 1 for k in S.DOMAIN_SIMS if k <= 8]
    assert sorted(train_rows) == [0, 1, 2, 3, 6, 7] and sorted(domain_rows) == [4, 5]
    for split, rows, (start, stop), horizon in (
            (data.train, train_rows, spec.train_starts, 6), (data.val, train_rows, spec.val_starts, 6),
            (data.test_future, train_rows, spec.future_starts, 20), (data.test_domain, domain_rows, spec.domain_starts, 20)):
        expected_x, expected_y = [], []
        for r in rows:
            for s in range(start, stop):
                expected_x.append(frames[r, s + 2:s + 12])
                expected_y.append(frames[r, s + 12:s + 12 + horizon])
        assert len(split.x) == len(split.y) == len(expected_x)
        assert torch.equal(split.x[torch.arange(len(split.x))], torch.stack(expected_x))
        assert torch.equal(split.y[:], torch.stack(expected_y))
        assert torch.equal(split.x[3], expected_x[3]) and split.y.shape == (len(expected_y), horizon, 2, 32, 32)
    # stride thins the starts; subset picks windows
    thin = S.load_smoke("tiny", cache_dir=smoke_cache, progress=False, stride=4)
    assert len(thin.train.x) == len(train_rows) * 3 and torch.equal(thin.train.x[1], frames[train_rows[0], 6:16])
    sub = data.train.subset(torch.tensor([5, 0]))
    assert torch.equal(sub.x[:], data.train.x[torch.tensor([5, 0])])
    assert sub.to(torch.float64).y[:].dtype == torch.float64


@pytest.mark.parametrize("change, message", [
    (dict(grid=0), "grid must be a positive int"),
    (dict(n_sims=37), "n_sims must be at most 36"),
    (dict(radius=20.0), r"radius must be in \(0, grid / 2"),
    (dict(downsample=3), "downsample 3 must divide grid 32"),
    (dict(side_factors=(0.01, 0.01)), "side_factors must be 4 positive numbers"),
    (dict(future_starts=(18, 40)), r"future_starts \(18, 40\) needs 71 frames .* give 59"),
    (dict(val_starts=(5, 5)), r"val_starts must be \[start, stop\)"),
    (dict(n_sims=4), "leaves no training or no test-domain simulation"),
    (dict(stride=0), "stride must be a positive int"),
])
def test_bad_parameters_give_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as e:
        S.check_spec(dataclasses.replace(S.PRESETS["tiny"], **change))
    assert "\n" not in str(e.value)


def test_bad_preset_and_unknown_parameter(tmp_path):
    with pytest.raises(ValueError, match=r"preset must be one of \['paper', 'small', 'tiny'\], got 'huge'"):
        S.load_smoke("huge", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['gridsize'\]"):
        S.load_smoke("tiny", cache_dir=str(tmp_path), gridsize=8)
