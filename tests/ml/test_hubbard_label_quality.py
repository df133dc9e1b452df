"""Quality of hp.x labels: band gaps per spin channel of the perturbed scf, and the filter built on them."""
from __future__ import annotations

import numpy as np
import pytest

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.hubbard.records import (
    HUBBARD_TARGET_SPECS,
    filter_hubbard_record,
    hubbard_label_issues,
    spin_channel_gaps,
)

WEIGHTS = np.array([1.0, 3.0])  # two k points


def test_gaps_with_smearing_insulating_and_metallic_channels():
    # up: two bands below E_F = 0 at both k, one above -> gapped by 1.5 - (-0.2) eV
    up = np.array([[-3.0, -0.5, 2.0], [-2.5, -0.2, 1.5]])
    # down: the second band crosses E_F between the k points -> metallic
    down = np.array([[-3.0, -0.1, 2.0], [-2.5, 0.3, 1.5]])
    occupations = np.array([[[1, 1, 0], [1, 1, 0]], [[1, 1, 0], [1, 0, 0]]], float)
    (n_up, gap_up), (n_down, gap_down) = spin_channel_gaps(np.stack([up, down]), occupations, WEIGHTS, fermi_energy=0.0)
    assert gap_up == pytest.approx(1.7) and gap_down == 0.0
    assert n_up == pytest.approx(2.0) and n_down == pytest.approx(1.25)  # weights 1:3 normalised


def test_gaps_with_fixed_occupations():
    bands = np.array([[[-3.0, -0.5, 2.0], [-2.5, -0.2, 1.5]]])
    (n, gap), again = spin_channel_gaps(bands, np.array([[[1, 1, 0], [1, 1, 0]]], float), WEIGHTS)
    assert (n, gap) == (pytest.approx(2.0), pytest.approx(1.7)) and again == (n, gap)  # non-spin-polarised: both
    (_, gap_fractional), _ = spin_channel_gaps(bands, np.array([[[1, 0.5, 0], [1, 0.5, 0]]], float), WEIGHTS)
    assert gap_fractional == 0.0


def test_gaps_of_a_non_polarized_run_with_two_electrons_per_state():
    """aiida's BandsData of an nspin=1 run: [nk, nb] with occupations 0..2. Read as 0..1, every occupied state
    counted twice and the gap was NaN ('all bands filled'): LiCoO2, NiO2 and SrTiO3 labels were all flagged."""
    bands = np.array([[-3.0, -0.5, 2.0, 4.0], [-2.5, -0.2, 1.5, 3.0]])
    occupations = np.array([[2, 2, 0, 0], [2, 2, 0, 0]], float)
    (n, gap), again = spin_channel_gaps(bands, occupations, WEIGHTS)
    assert n == pytest.approx(2.0) and gap == pytest.approx(1.7) and again == (n, gap)


def scf_info(name, gap_up, gap_down, magnetization=2.0, converged=True):
    return {"name": name, "scf_converged": converged, "band_gap_up_ev": gap_up, "band_gap_down_ev": gap_down,
            "total_magnetization": magnetization}


def test_label_issues_name_the_reason_and_never_read_the_label():
    assert hubbard_label_issues(scf_info("NiO", 2.2, 2.8)) == []
    assert hubbard_label_issues(scf_info("FeO", 0.0, 0.0)) == [
        "up-spin channel metallic (needs > 0 eV)", "down-spin channel metallic (needs > 0 eV)"]
    assert hubbard_label_issues(scf_info("X", 1.0, 1.0, converged=False)) == ["scf not converged"]
    # majority channel only: the sign of the magnetization picks it
    assert hubbard_label_issues(scf_info("FeO", 1.78, 0.0, 4.0), channels="majority") == []
    assert hubbard_label_issues(scf_info("FeO", 1.78, 0.0, -4.0), channels="majority") == [
        "down-spin channel metallic (needs > 0 eV)"]
    assert hubbard_label_issues(scf_info("MnO", 0.03, 3.4), min_gap_ev=0.1) == [
        "up-spin channel gap 0.03 eV (needs > 0.1 eV)"
    ]
    with pytest.raises(ValueError, match=r"old: no scf diagnostics \['scf_converged'"):
        hubbard_label_issues({"name": "old"})


def test_filter_keeps_insulating_labels_and_reports_the_removed_ones(random_atoms):
    from aiida_eqml.ml.dataset import Sample

    samples = []
    for index, (gap_up, gap_down) in enumerate([(2.2, 2.8), (0.0, 0.0), (0.5, 3.0)]):
        atoms = random_atoms(index, n_atoms=2, symbols=("Ni", "O"))
        samples.append(Sample.from_ase(atoms, node_targets={"hubbard_u": np.array([[5.0], [np.nan]])},
                                       info=scf_info(f"s{index}", gap_up, gap_down)))
    record = Dataset(samples, {"hubbard_u": HUBBARD_TARGET_SPECS["hubbard_u"]})
    kept, removed = filter_hubbard_record(record)
    assert [s.info["name"] for s in kept.samples] == ["s0", "s2"]
    assert removed == {"s1": ["up-spin channel metallic (needs > 0 eV)", "down-spin channel metallic (needs > 0 eV)"]}
