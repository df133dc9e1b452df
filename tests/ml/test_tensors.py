"""Cartesian <-> irreps conversion: exact round trips, rotation consistency, parity."""

import e3nn_jax as e3nn
import numpy as np
import pytest

from aiida_eqml.ml.tensors import CartesianTensorType, tensor_type

CASES = [
    ("i", None, "1o"),
    ("ij", None, "0e+1e+2e"),
    ("ij=ji", None, "0e+2e"),
    ("ijk=jik", None, "2x1o+2o+3o"),
    ("ij", {"i": "1e", "j": "1e"}, "0e+1e+2e"),  # NMR shielding: axial x axial
    ("ij", {"i": "1o", "j": "1e"}, "0o+1o+2o"),  # polar x axial
]


def _symmetrize(formula, x):
    if formula == "ij=ji":
        return 0.5 * (x + np.swapaxes(x, -1, -2))
    if formula == "ijk=jik":
        return 0.5 * (x + np.swapaxes(x, -2, -3))
    return x


def _rotate(x, rot, index_irreps, indices):
    """Rotate a Cartesian tensor; axial indices pick up det(R)."""
    for axis, letter in enumerate(indices):
        ir = e3nn.Irreps(index_irreps[letter])
        m = rot * (np.linalg.det(rot) if ir == e3nn.Irreps("1e") else 1.0)
        x = np.moveaxis(np.tensordot(x, m, axes=([1 + axis], [1])), -1, 1 + axis)
    return x


@pytest.mark.parametrize("formula,index_irreps,irreps", CASES)
def test_irreps_round_trip_and_rotation(formula, index_irreps, irreps, rotation):
    ttype = CartesianTensorType(formula, index_irreps)
    assert ttype.irreps == e3nn.Irreps(irreps)
    rng = np.random.default_rng(0)
    x = _symmetrize(formula, rng.normal(size=(7,) + ttype.shape))
    y = ttype.to_irreps(x)
    assert y.shape == (7, ttype.irreps.dim)
    np.testing.assert_allclose(ttype.to_cartesian(y), x, atol=1e-12)
    # Orthonormal change of basis: the norm is preserved.
    np.testing.assert_allclose(np.linalg.norm(y.array, axis=1), np.linalg.norm(x.reshape(7, -1), axis=1), rtol=1e-12)
    for improper in (False, True):
        rot = rotation(3, improper)
        x_rot = _rotate(x, rot, ttype.index_irreps, ttype.indices)
        d = np.asarray(ttype.irreps.D_from_matrix(rot))
        # e3nn computes D in float32.
        np.testing.assert_allclose(ttype.to_irreps(x_rot).array, y.array @ d.T, atol=2e-6)


def test_float32_round_trip_and_jax_arrays():
    import jax.numpy as jnp

    ttype = tensor_type("raman")
    x = _symmetrize("ijk=jik", np.random.default_rng(1).normal(size=(5, 3, 3, 3))).astype(np.float32)
    back = ttype.to_cartesian(ttype.to_irreps(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-6)


def test_projection_removes_the_antisymmetric_part():
    ttype = CartesianTensorType("ij=ji")
    x = np.random.default_rng(2).normal(size=(3, 3))
    np.testing.assert_allclose(ttype.to_cartesian(ttype.to_irreps(x)), 0.5 * (x + x.T), atol=1e-12)


def test_shape_errors_are_clear():
    ttype = CartesianTensorType("ijk=jik")
    with pytest.raises(ValueError, match=r"expected trailing shape \(3, 3, 3\), got array of shape \(4, 3, 3\)"):
        ttype.to_irreps(np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match=r"expected irreps 2x1o\+1x2o\+1x3o"):
        ttype.to_cartesian(e3nn.IrrepsArray("0e+2e", np.zeros((2, 6))))
    with pytest.raises(ValueError, match="expected trailing dimension 18"):
        ttype.to_cartesian(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="must be '1o' \\(polar\\) or '1e' \\(axial\\)"):
        CartesianTensorType("ij", {"i": "2e"})
    with pytest.raises(ValueError, match="bad tensor formula"):
        CartesianTensorType("i1")
