"""Real SO(3) irreps and their generators: Lie-algebra and group properties, sparse vs dense action."""
import pytest
import torch

from relaxeq_fast.reps import (VN, Irreps, irrep_generators, random_rotation, rotation_to_axis_angle,
                               so3_generators)

EPS = {(i, j, k): s for (i, j, k), s in
       {(0, 1, 2): 1, (1, 2, 0): 1, (2, 0, 1): 1, (0, 2, 1): -1, (2, 1, 0): -1, (1, 0, 2): -1}.items()}


def test_so3_generators_are_cross_products():
    G = so3_generators()
    v = torch.randn(3, dtype=torch.float64)
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = 1
        assert torch.allclose(G[k] @ v, torch.linalg.cross(e, v), atol=1e-15)


@pytest.mark.parametrize("l", [0, 1, 2, 3])
def test_irrep_generators_form_so3(l):
    A = irrep_generators(l)
    assert A.shape == (3, 2 * l + 1, 2 * l + 1)
    assert torch.allclose(A, -A.transpose(1, 2), atol=1e-14), "generators must be skew"
    for (i, j, k), sign in EPS.items():
        comm = A[i] @ A[j] - A[j] @ A[i]
        assert torch.allclose(comm, sign * A[k], atol=1e-12), f"[A_{i}, A_{j}] != {sign} A_{k} for l={l}"
    # Casimir: Σ A_k² = -l(l+1) I identifies the irrep of degree l.
    casimir = sum(A[k] @ A[k] for k in range(3))
    assert torch.allclose(casimir, -l * (l + 1) * torch.eye(2 * l + 1, dtype=torch.float64), atol=1e-12)


def test_l1_block_is_xyz():
    assert torch.allclose(irrep_generators(1), so3_generators(), atol=1e-15)
    R = random_rotation(generator=torch.Generator().manual_seed(1))
    assert torch.allclose(Irreps("1x1").rotation_matrix(R), R, atol=1e-12)


@pytest.mark.parametrize("spec", ["1x0", "2x1", "1x2", "3x3", "2x0+1x1+2x2+1x3"])
def test_rotation_matrix_is_a_homomorphism(spec):
    rep = Irreps(spec)
    g = torch.Generator().manual_seed(0)
    R1, R2 = random_rotation(generator=g), random_rotation(generator=g)
    D1, D2, D12 = rep.rotation_matrix(R1), rep.rotation_matrix(R2), rep.rotation_matrix(R1 @ R2)
    assert torch.allclose(D12, D1 @ D2, atol=1e-10)
    assert torch.allclose(D1 @ D1.T, torch.eye(rep.dim, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("rep", [VN(5), Irreps("3x0+2x1+1x2+2x3"), Irreps("1x3")])
def test_apply_generator_matches_dense(rep):
    x = torch.randn(7, rep.dim, dtype=torch.float64)
    dense = rep.generator_matrices()
    together = rep.apply_generators(x)
    for k in range(3):
        assert torch.allclose(rep.apply_generator(k, x), x @ dense[k].T, atol=1e-13)
        assert torch.allclose(together[k], x @ dense[k].T, atol=1e-13)
    one_row = rep.apply_generators(x[0])
    assert one_row.shape == (3, rep.dim) and torch.allclose(one_row, together[:, 0], atol=0)


def test_vn_is_irreps_of_vectors():
    assert torch.allclose(VN(4).generator_matrices(), Irreps("4x1").generator_matrices())
    R = random_rotation(generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    assert torch.allclose(VN(4).rotate(R, x).reshape(2, 12), Irreps("4x1").rotate(R, x.reshape(2, 12)), atol=1e-12)


@pytest.mark.parametrize("angle", [0.0, 1e-8, 0.3, 2.0, 3.1, 3.14159265, torch.pi])
def test_axis_angle_roundtrip(angle):
    axis = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64), dim=0)
    omega = axis * angle
    R = torch.linalg.matrix_exp(torch.einsum("k,kij->ij", omega, so3_generators()))
    back = torch.linalg.matrix_exp(torch.einsum("k,kij->ij", rotation_to_axis_angle(R), so3_generators()))
    assert torch.allclose(back, R, atol=1e-9)


def test_random_rotation_is_proper():
    R = random_rotation(16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.linalg.det(R), torch.ones(16, dtype=torch.float64))
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-12)


@pytest.mark.parametrize("bad,msg", [("2x4", "l in [0, 3]"), ("ax1", "cannot parse"), ("0x1", "positive dimension")])
def test_bad_irreps(bad, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        Irreps(bad)


def test_bad_vn_channels():
    with pytest.raises(ValueError, match="channels"):
        VN(0)
