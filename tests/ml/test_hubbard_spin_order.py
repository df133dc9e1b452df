"""The local magnetic order descriptor (aiida_eqml.ml.hubbard.spin_order): physics and invariances."""

import numpy as np
import pytest
from ase.build import bulk
from conftest import train_hubbard_model
from scipy.spatial.transform import Rotation

from aiida_eqml.ml.hubbard.records import hubbard_training_dataset, site_attr_irreps
from aiida_eqml.ml.hubbard.spin_order import BOND_CUTOFF, BOND_ON, bond_weight, site_moments, spin_order


def _occupations(moments, hubbard_l, traces=5.0):
    """Diagonal on-site blocks [n, 2, 5, 5] with tr(up) - tr(down) = moment."""
    n = len(hubbard_l)
    occ = np.zeros((n, 2, 5, 5))
    for i, (m, l) in enumerate(zip(moments, hubbard_l)):
        if l < 0:
            continue
        d = 2 * l + 1
        occ[i, 0, :d, :d] = np.eye(d) * (traces + m) / (2 * d)
        occ[i, 1, :d, :d] = np.eye(d) * (traces - m) / (2 * d)
    return occ


def _afm2_moments(atoms, moment, a):
    """+moment / -moment on alternating (111) planes of the TM sublattice (cubic lattice parameter a), 0 on O."""
    normal = np.array([1.0, 1.0, 1.0]) / np.sqrt(3.0)
    spacing = a / np.sqrt(3.0)  # distance between (111) TM planes
    out = []
    for symbol, position in zip(atoms.get_chemical_symbols(), atoms.positions):
        if symbol == "O":
            out.append(0.0)
        else:
            plane = int(np.rint(position @ normal / spacing))
            out.append(moment if plane % 2 == 0 else -moment)
    return np.array(out)


def _manifolds(atoms):
    return np.array([2 if s != "O" else -1 for s in atoms.get_chemical_symbols()])


def test_bond_weight_is_one_then_a_smooth_ramp_to_zero():
    assert bond_weight([1.9, BOND_ON]).tolist() == [1.0, 1.0]
    assert bond_weight([BOND_CUTOFF, 3.5]).tolist() == [0.0, 0.0]
    assert bond_weight([(BOND_ON + BOND_CUTOFF) / 2])[0] == pytest.approx(0.5)


def test_site_moments_are_the_traces_of_up_minus_down():
    occ = _occupations([4.5, -1.5, 0.0], [2, 2, -1])
    np.testing.assert_allclose(site_moments(occ, [2, 2, -1]), [4.5, -1.5, 0.0])
    assert not np.any(site_moments(occ[:, :1], [2, 2, -1]))  # one spin channel: not polarised


@pytest.mark.parametrize("strain", [0.94, 1.0, 1.06])
def test_rocksalt_fm_and_afm2_have_their_path_counted_values_at_every_strain(strain):
    """FM: all 30 two-bond paths parallel, o = mu^2. AFM-II: 24 paths to the 12 nearest (half antiparallel) and 6 to
    the 6 next-nearest (all antiparallel): o = -6/30 mu^2, whatever the strain (no third shell)."""
    atoms = bulk("MnO", "rocksalt", a=4.445 * strain).repeat((2, 2, 2))
    hubbard_l = _manifolds(atoms)
    mu = 4.6 / 5.0
    fm = np.where(hubbard_l == 2, 4.6, 0.0)
    order = spin_order(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, _occupations(fm, hubbard_l),
                       hubbard_l)
    np.testing.assert_allclose(order[hubbard_l == 2], mu**2, rtol=1e-12)
    assert not np.any(order[hubbard_l < 0])
    afm = _afm2_moments(atoms, 4.6, 4.445 * strain)
    assert sorted(set(afm[hubbard_l == 2])) == [-4.6, 4.6]
    order = spin_order(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, _occupations(afm, hubbard_l),
                       hubbard_l)
    np.testing.assert_allclose(order[hubbard_l == 2], -0.2 * mu**2, rtol=1e-12)


def test_invariant_under_spin_swap_rotation_reflection_and_supercell():
    atoms = bulk("NiO", "rocksalt", a=4.17).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=3)
    hubbard_l = _manifolds(atoms)
    moments = _afm2_moments(atoms, 1.7, 4.17) * np.random.default_rng(0).uniform(0.9, 1.1, len(atoms))
    occ = _occupations(moments, hubbard_l)
    reference = spin_order(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, occ, hubbard_l)
    assert np.all(reference[hubbard_l == 2] != 0)
    swapped = spin_order(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, occ[:, ::-1], hubbard_l)
    np.testing.assert_allclose(swapped, reference, atol=1e-12)
    for matrix in (Rotation.from_euler("zyx", [0.3, -1.1, 2.0]).as_matrix(), -np.eye(3) @ np.diag([1, 1, -1])):
        # a proper rotation and a reflection (det -1): the moments are scalars of the sites, the occupation traces
        # do not change, so o must not either
        rotated = spin_order(atoms.numbers, atoms.positions @ matrix.T, atoms.cell.array @ matrix.T, atoms.pbc, occ,
                             hubbard_l)
        np.testing.assert_allclose(rotated, reference, atol=1e-12)
    big = atoms.repeat((2, 1, 1))
    doubled = spin_order(big.numbers, big.positions, big.cell.array, big.pbc, np.concatenate([occ, occ]),
                         np.concatenate([hubbard_l, hubbard_l]))
    np.testing.assert_allclose(doubled, np.concatenate([reference, reference]), atol=1e-12)


def test_the_site_descriptor_ends_with_the_order_only_when_asked():
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.records import HUBBARD_TARGET_SPECS, hubbard_record_sample

    atoms = bulk("MnO", "rocksalt", a=4.445).repeat((1, 1, 2))
    hubbard_l = _manifolds(atoms)
    moments = np.where(hubbard_l == 2, 4.6, 0.0)
    occupations = _occupations(moments, hubbard_l)
    tm = [i for i in range(len(atoms)) if hubbard_l[i] == 2]
    sample = hubbard_record_sample(atoms, {i: occupations[i] for i in tm}, {i: 4.0 for i in tm},
                                   target_u={i: 3.5 for i in tm})
    record = Dataset([sample], HUBBARD_TARGET_SPECS)
    plain, attrs = hubbard_training_dataset(record, (2,))
    ordered, attrs_ordered = hubbard_training_dataset(record, (2,), spin_order=True)
    assert attrs_ordered["node_attrs"]["hubbard_site"] == str(site_attr_irreps((2,), spin_order=True))
    assert site_attr_irreps((2,), spin_order=True).dim == site_attr_irreps((2,)).dim + 1
    site, site_ordered = plain.samples[0].node_attrs["hubbard_site"], ordered.samples[0].node_attrs["hubbard_site"]
    np.testing.assert_allclose(site_ordered[:, :-1], site)
    np.testing.assert_allclose(site_ordered[hubbard_l == 2, -1], (4.6 / 5.0) ** 2, rtol=1e-6)


def test_train_cli_stores_the_flag_and_a_predictor_reads_the_raw_record_with_it(tmp_path):
    """A model trained with ``hubbard.spin_order`` on a real AFM-II NiO record: the flag is in the model file, a
    Predictor of that file builds the ordered descriptors from the raw occupations itself (the ML loop's path), and
    the prediction depends on the order: flipping one Ni's spin channels (AFM-II -> FM-like) changes U."""
    from pathlib import Path

    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.modelfile import load_model
    from aiida_eqml.ml.predict import load_predictor

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "hubbard_campaign"
    record = Dataset.load(root / "NiO_rocksalt_afm2_s100.npz")
    path = train_hubbard_model(record, tmp_path, {"spin_order": True}, {"train": [0], "val": [1], "test": []}, 1)
    _, _, metadata = load_model(path)
    assert metadata["hubbard"]["spin_order"] is True
    predictor = load_predictor(path)
    sample = record.samples[0]
    hubbard_l = sample.node_attrs["hubbard_l"]
    nickel = np.flatnonzero(hubbard_l == 2)
    assert len(nickel) == 2
    order = spin_order(sample.numbers, sample.positions, sample.cell, sample.pbc, sample.node_attrs["occupations"],
                       hubbard_l)
    assert np.all(order[nickel] < 0)  # AFM-II
    from_raw = predictor.predict_hubbard(record.subset([0]))[0]["hubbard_u"]
    descriptors, _ = hubbard_training_dataset(record.subset([0]), spin_order=True)
    np.testing.assert_allclose(predictor.predict_hubbard(descriptors)[0]["hubbard_u"][nickel], from_raw[nickel],
                               rtol=1e-6)
    import dataclasses

    occupations = np.array(sample.node_attrs["occupations"])
    occupations[nickel[1]] = occupations[nickel[1], ::-1]  # both Ni now parallel
    ferro = dataclasses.replace(sample, node_attrs={**sample.node_attrs, "occupations": occupations})
    flipped = predictor.predict_hubbard(Dataset([ferro], record.target_specs))[0]["hubbard_u"]
    assert not np.allclose(flipped[nickel], from_raw[nickel], rtol=1e-4)
