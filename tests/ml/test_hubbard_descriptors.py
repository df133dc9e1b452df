"""Occupation-matrix descriptors: QE orbital order -> e3nn, irreps, spin-swap invariants.

Ground truth for the orbital convention are real pw.x runs (tests/fixtures/qe72) of AFM NiO and of
the same crystal rigidly rotated by ``generate.ROTATION``: their occupation matrices must be related
by the Wigner matrices of that rotation in the converted basis.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aiida_eqml.ml.hubbard import (
    block_irreps,
    occupation_irreps,
    pair_descriptor_irreps,
    pair_descriptors,
    qe_real_spherical_harmonics,
    qe_to_e3nn_matrix,
    qe_wigner_matrix,
    site_descriptor_irreps,
    site_descriptors,
    spin_invariant_irreps,
    to_e3nn_basis,
)

# The pure file parsers (no aiida import) read the real QE output.
from aiida_eqml.parsers.occupations import (
    intersite_blocks,
    nsg_shape,
    parse_hubbard_neighbours,
    parse_occup_txt,
    parse_onsite_occupations_xml,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qe72"
_spec = importlib.util.spec_from_file_location("qe72_generate", FIXTURES / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)
ROTATION = generate.ROTATION
SPECIES = ["Ni", "O"]
SPECIES_OF_ATOM = np.array([0, 0, 1, 1])  # Ni1, Ni2, O, O


def load_run(case: str):
    """(onsite {atom: [2, D, D]}, intersite {(i, j, S): [2, Di, Dj]}) of a fixture run, QE m order."""
    directory = FIXTURES / case
    onsite = parse_onsite_occupations_xml((directory / "data-file-schema.xml").read_text())
    intersite = {}
    if (directory / "occup.txt").exists():
        text = (directory / "occup.txt").read_text()
        neighbours = parse_hubbard_neighbours((directory / "aiida.out").read_text())
        nsg = parse_occup_txt(text, nsg_shape(text, onsite.manifolds, 4, onsite.nspin))
        intersite = {(b.i, b.j, b.translation): b for b in intersite_blocks(nsg, neighbours, onsite.manifolds, 4)}
    return onsite, intersite


def padded_onsite(onsite):
    out = np.zeros((4, 2, 5, 5))
    for atom, block in onsite.matrices.items():
        d = block.shape[-1]
        out[atom, :, :d, :d] = block
    return out


def site_inputs(onsite):
    return dict(
        onsite_qe=padded_onsite(onsite),
        site_l=np.array([m.l for m in onsite.manifolds]),
        species=SPECIES_OF_ATOM,
        num_species=2,
        hubbard_u=np.array([5.0, 5.0, 1.0, 1.0]),
    )


def pair_inputs(intersite):
    keys = sorted(intersite)
    blocks = np.zeros((len(keys), 2, 5, 5))
    pair_l = []
    for k, key in enumerate(keys):
        matrix = intersite[key].matrix
        blocks[k, :, : matrix.shape[1], : matrix.shape[2]] = matrix
        pair_l.append((2, 1) if key[0] < 2 else (1, 2))
    return keys, dict(
        intersite_qe=blocks,
        pair_l=np.array(pair_l),
        species_pairs=SPECIES_OF_ATOM[np.array([[k[0], k[1]] for k in keys])],
        num_species=2,
        hubbard_v=np.array([intersite[k].hubbard_v_ev for k in keys]),
        distances=np.array([intersite[k].distance_bohr for k in keys]) * 0.529177210903,
        pair_ls=((2, 1), (1, 2)),
    )


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)  # proper


# ------------------------------------------------------------------ the basis conversion


def test_qe_harmonics_are_ylmr2():
    """Closed forms of QE's ylmr2: p = c (z, -x, -y), d_{x2-y2} and d_xy as the 4th/5th components."""
    r = np.random.default_rng(1).normal(size=(20, 3))
    x, y, z = (r / np.linalg.norm(r, axis=1, keepdims=True)).T
    c1 = math.sqrt(3 / (4 * math.pi))
    np.testing.assert_allclose(qe_real_spherical_harmonics(1, r), c1 * np.stack([z, -x, -y], 1), atol=1e-12)
    c2 = math.sqrt(15 / (16 * math.pi))
    d = qe_real_spherical_harmonics(2, r)
    np.testing.assert_allclose(d[:, 0], math.sqrt(5 / (16 * math.pi)) * (3 * z**2 - 1), atol=1e-12)
    np.testing.assert_allclose(d[:, 1], -2 * c2 * x * z, atol=1e-12)
    np.testing.assert_allclose(d[:, 3], c2 * (x**2 - y**2), atol=1e-12)
    np.testing.assert_allclose(d[:, 4], 2 * c2 * x * y, atol=1e-12)


@pytest.mark.parametrize("l", [0, 1, 2, 3])
def test_qe_to_e3nn_matrix(l):
    t = qe_to_e3nn_matrix(l)
    np.testing.assert_allclose(t @ t.T, np.eye(2 * l + 1), atol=1e-10)
    r = np.random.default_rng(7).normal(size=(30, 3))  # directions other than those of the fit
    y_e3nn = e3nn.spherical_harmonics(l, e3nn.IrrepsArray("1o", jnp.asarray(r)), True, "integral").array
    np.testing.assert_allclose(qe_real_spherical_harmonics(l, r) @ t.T, y_e3nn, atol=1e-5)
    # the Wigner matrix in QE's basis rotates QE's harmonics: Y_qe(R r) = W(R) Y_qe(r)
    rot = random_rotation(l)
    np.testing.assert_allclose(
        qe_real_spherical_harmonics(l, r @ rot.T),
        qe_real_spherical_harmonics(l, r) @ qe_wigner_matrix(l, rot).T,
        atol=1e-5,
    )


def test_rotated_pw_run_transforms_with_wigner_matrices():
    """Real pw.x: n(rotated crystal) = D(R) n D(R)^T in e3nn's basis, for d-d, p-p, d-p and p-d blocks."""
    onsite, _ = load_run("nio_u")
    onsite_rot, _ = load_run("nio_u_rotated")
    d2 = np.asarray(e3nn.Irrep("2e").D_from_matrix(jnp.asarray(ROTATION)))
    for atom in (0, 1):
        n = np.asarray(to_e3nn_basis(onsite.matrices[atom], 2, 2))
        n_rot = np.asarray(to_e3nn_basis(onsite_rot.matrices[atom], 2, 2))
        np.testing.assert_allclose(d2 @ n @ d2.T, n_rot, atol=1e-4)
        # the check has teeth: QE's order taken for e3nn's is off by far more than the tolerance
        assert np.abs(d2 @ onsite.matrices[atom] @ d2.T - onsite_rot.matrices[atom]).max() > 0.1
    _, intersite = load_run("nio_uv")
    _, intersite_rot = load_run("nio_uv_rotated")
    assert set(intersite) == set(intersite_rot) and len(intersite) == 24
    d1 = np.asarray(e3nn.Irrep("1o").D_from_matrix(jnp.asarray(ROTATION)))
    wrong_p = np.asarray(e3nn.Irrep("1o").D_from_matrix(jnp.asarray(ROTATION.T)))
    worst, worst_wrong = 0.0, 0.0
    for key, block in intersite.items():
        l1, l2, da, db = (2, 1, d2, d1) if key[0] < 2 else (1, 2, d1, d2)
        n = np.asarray(to_e3nn_basis(block.matrix, l1, l2))
        n_rot = np.asarray(to_e3nn_basis(intersite_rot[key].matrix, l1, l2))
        worst = max(worst, np.abs(da @ n @ db.T - n_rot).max())
        wa, wb = (d2, wrong_p) if key[0] < 2 else (wrong_p, d2)
        worst_wrong = max(worst_wrong, np.abs(wa @ n @ wb.T - n_rot).max())
    assert worst < 1e-5, worst  # float32 rounding: both U+V runs use nosym and the same k-points
    assert worst_wrong > 1e-2


# ------------------------------------------------------------------ irreps


def test_block_irreps():
    assert block_irreps(2, 2, True) == e3nn.Irreps("0e+2e+4e")
    assert block_irreps(1, 1, True) == e3nn.Irreps("0e+2e")
    assert block_irreps(2, 1, False) == e3nn.Irreps("1o+2o+3o")
    assert block_irreps(2, 2, False) == e3nn.Irreps("0e+1e+2e+3e+4e")
    with pytest.raises(ValueError, match="l1 == l2"):
        block_irreps(2, 1, True)


def test_occupation_irreps_norm_equivariance_and_symmetry():
    rng = np.random.default_rng(3)
    for l1, l2 in [(2, 2), (2, 1), (1, 2), (1, 1)]:
        block = rng.normal(size=(2 * l1 + 1, 2 * l2 + 1))
        irreps = occupation_irreps(block, l1, l2, symmetric=False)
        assert abs(float(jnp.sum(irreps.array**2)) - float(np.sum(block**2))) < 1e-4  # orthonormal map
        rot = random_rotation(l1 + 10 * l2)
        d1 = np.asarray(e3nn.Irrep(l1, (-1) ** l1).D_from_matrix(jnp.asarray(rot)))
        d2 = np.asarray(e3nn.Irrep(l2, (-1) ** l2).D_from_matrix(jnp.asarray(rot)))
        rotated = occupation_irreps(d1 @ block @ d2.T, l1, l2, symmetric=False)
        np.testing.assert_allclose(rotated.array, irreps.transform_by_matrix(jnp.asarray(rot)).array, atol=1e-5)
    # a symmetric block has no odd-L part, which is why on-site blocks keep 0e+2e+4e only
    sym = rng.normal(size=(5, 5))
    full = occupation_irreps(sym + sym.T, 2, 2, symmetric=False)
    odd = jnp.concatenate([full.filter(keep="1e").array, full.filter(keep="3e").array], axis=-1)
    assert float(jnp.abs(odd).max()) < 1e-5


# ------------------------------------------------------------------ descriptors on real runs


def test_site_descriptors_are_equivariant_on_the_rotated_run():
    onsite, _ = load_run("nio_u")
    onsite_rot, _ = load_run("nio_u_rotated")
    desc = site_descriptors(**site_inputs(onsite))
    desc_rot = site_descriptors(**site_inputs(onsite_rot))
    assert desc.irreps == site_descriptor_irreps((1, 2), 2)
    np.testing.assert_allclose(desc_rot.array, desc.transform_by_matrix(jnp.asarray(ROTATION)).array, atol=2e-4)
    scalars = desc.filter(keep="0e").array
    np.testing.assert_allclose(desc_rot.filter(keep="0e").array, scalars, atol=2e-4)  # invariants
    assert float(jnp.abs(desc.array - desc_rot.array).max()) > 0.05  # the L>0 parts did move


def test_site_descriptors_invariant_under_wigner_rotation_in_qe_basis():
    """Rotate occupation matrices with Wigner matrices built in QE's basis (proper and improper)."""
    onsite, _ = load_run("nio_u")
    inputs = site_inputs(onsite)
    desc = site_descriptors(**inputs)
    for rot in (random_rotation(5), -random_rotation(6)):
        rotated = np.zeros_like(inputs["onsite_qe"])
        for atom, l in enumerate(inputs["site_l"]):
            w = qe_wigner_matrix(l, rot)
            d = 2 * l + 1
            rotated[atom, :, :d, :d] = w @ inputs["onsite_qe"][atom, :, :d, :d] @ w.T
        moved = site_descriptors(**{**inputs, "onsite_qe": rotated})
        np.testing.assert_allclose(moved.array, desc.transform_by_matrix(jnp.asarray(rot)).array, atol=1e-4)
        np.testing.assert_allclose(moved.filter(keep="0e").array, desc.filter(keep="0e").array, atol=1e-4)


def test_pair_descriptors_are_equivariant_on_the_rotated_run():
    _, intersite = load_run("nio_uv")
    _, intersite_rot = load_run("nio_uv_rotated")
    keys, inputs = pair_inputs(intersite)
    keys_rot, inputs_rot = pair_inputs(intersite_rot)
    assert keys == keys_rot
    desc = pair_descriptors(**inputs)
    desc_rot = pair_descriptors(**inputs_rot)
    assert desc.irreps == pair_descriptor_irreps(((2, 1), (1, 2)), 2)
    np.testing.assert_allclose(desc_rot.array, desc.transform_by_matrix(jnp.asarray(ROTATION)).array, atol=1e-4)


def test_spin_swap_leaves_descriptors_unchanged_and_magnetism_is_seen():
    onsite, intersite = load_run("nio_u")[0], load_run("nio_uv")[1]
    inputs = site_inputs(onsite)
    desc = site_descriptors(**inputs)
    swapped = site_descriptors(**{**inputs, "onsite_qe": inputs["onsite_qe"][:, ::-1]})
    np.testing.assert_allclose(swapped.array, desc.array, atol=1e-6)
    _, pairs = pair_inputs(intersite)
    pair_desc = pair_descriptors(**pairs)
    pair_swapped = pair_descriptors(**{**pairs, "intersite_qe": pairs["intersite_qe"][:, ::-1]})
    np.testing.assert_allclose(pair_swapped.array, pair_desc.array, atol=1e-6)
    # the moment is not lost: a non-magnetic Ni with the same spin-averaged n gets other descriptors
    mean = inputs["onsite_qe"].mean(axis=1, keepdims=True).repeat(2, axis=1)
    non_magnetic = site_descriptors(**{**inputs, "onsite_qe": mean})
    assert float(jnp.abs(non_magnetic.array[0] - desc.array[0]).max()) > 1e-2
    # the spin mean alone is identical, so the difference is in the tensor-product part
    up, down = e3nn.normal("0e+2e", jax.random.PRNGKey(0)), e3nn.normal("0e+2e", jax.random.PRNGKey(1))
    np.testing.assert_allclose(spin_invariant_irreps(up, down).array, spin_invariant_irreps(down, up).array, atol=1e-6)


def test_afm_equivalent_sites_get_the_same_descriptors():
    """Ni1/Ni2 (translation + spin flip) and O/O (inversion through Ni) of AFM NiO; the six Ni-O bonds
    of a Ni (its D3d site symmetry) share the same invariants."""
    onsite, intersite = load_run("nio_u")[0], load_run("nio_uv")[1]
    desc = np.asarray(site_descriptors(**site_inputs(onsite)).array)
    np.testing.assert_allclose(desc[0], desc[1], atol=2e-4)
    np.testing.assert_allclose(desc[2], desc[3], atol=2e-4)
    assert np.abs(desc[0] - desc[2]).max() > 0.1
    keys, pairs = pair_inputs(intersite)
    pair_scalars = np.asarray(pair_descriptors(**pairs).filter(keep="0e").array)
    rows = [k for k, key in enumerate(keys) if key[0] < 2]  # Ni -> O, 6 per Ni
    assert len(rows) == 12
    for k in rows:
        np.testing.assert_allclose(pair_scalars[k], pair_scalars[rows[0]], atol=5e-4)


def test_descriptors_jit_and_padding():
    onsite, _ = load_run("nio_u")
    inputs = site_inputs(onsite)
    inputs["site_l"] = np.array([2, 2, 1, -1])  # last atom: no Hubbard manifold
    eager = site_descriptors(**inputs)
    static = {k: v for k, v in inputs.items() if k != "onsite_qe"}
    jitted = jax.jit(lambda onsite_qe: site_descriptors(onsite_qe, **static).array)(jnp.asarray(inputs["onsite_qe"]))
    np.testing.assert_allclose(jitted, eager.array, atol=1e-6)
    occupation_part = eager.array[3, : -3]  # everything but one-hot + U
    assert float(jnp.abs(occupation_part).max()) == 0.0


def test_bad_input_is_rejected_with_a_clear_message():
    onsite, _ = load_run("nio_u")
    inputs = site_inputs(onsite)
    with pytest.raises(ValueError, match=r"onsite_qe must have shape \[4, nspin, 5, 5\]"):
        site_descriptors(**{**inputs, "onsite_qe": inputs["onsite_qe"][:, :, :3, :3]})
    with pytest.raises(ValueError, match=r"l=\[3\] are not in manifold_ls"):
        site_descriptors(**{**inputs, "site_l": np.array([2, 2, 3, 1])})
    with pytest.raises(ValueError, match="nspin \\(1 or 2\\)"):
        site_descriptors(**{**inputs, "onsite_qe": np.zeros((4, 3, 5, 5))})
    with pytest.raises(ValueError, match="species must be in 0..1"):
        site_descriptors(**{**inputs, "species": np.array([0, 0, 2, 1])})
    with pytest.raises(ValueError, match="l=4 is not supported"):
        qe_to_e3nn_matrix(4)
    with pytest.raises(ValueError, match="expected \\(5, 3\\)"):
        to_e3nn_basis(np.zeros((5, 5)), 2, 1)
