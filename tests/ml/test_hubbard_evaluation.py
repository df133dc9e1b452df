"""The pure functions of the leave-one-material-out Hubbard benchmark (aiida_eqml.ml.hubbard.evaluation): materials,
quality flags, splits that never leak a held-out material into training, and the three baselines. No training."""
from __future__ import annotations

from pathlib import Path

import ase
import numpy as np
import pytest

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.hubbard import evaluation as ev
from aiida_eqml.ml.hubbard.records import HUBBARD_TARGET_SPECS, hubbard_record_sample

ROOT = Path(__file__).resolve().parents[2]
OLD_RECORD = ROOT / "docs" / "benchmarks" / "hubbard_labels.npz"
CAMPAIGN = ROOT / "benchmarks" / "data" / "hubbard_campaign"

#: Synthetic law of the labels: U = a + b tr n per element (what the occupation-linear baseline must recover).
LAW = {"Ni": (1.0, 0.5), "Mn": (-1.0, 0.8), "Co": (0.5, 0.6), "Fe": (0.0, 0.7)}
#: The default materials: (name, metal, with V labels).
MATERIALS = (("NiO-rocksalt-fm", "Ni", True), ("MnO-rocksalt-fm", "Mn", False), ("CoO-rocksalt-fm", "Co", False))
V_LAW = (0.2, 0.1)


def _gapped(gap=1.0):
    return {"scf_converged": True, "band_gap_up_ev": gap, "band_gap_down_ev": gap, "total_magnetization": 2.0}


def synthetic_record(metal_sample=None, materials=MATERIALS) -> Dataset:
    """3 materials (NiO with V, MnO, CoO; or ``materials``) x 2 strains x 2 iterations of a 2-atom rock-salt cell."""
    rng = np.random.default_rng(0)
    samples = []
    for material, metal, with_v in materials:
        for strain in (0.98, 1.02):
            u_in, v_in = 5.0, 0.5
            for iteration in (1, 2):
                a = 4.2 * strain
                atoms = ase.Atoms(f"{metal}O", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]],
                                  cell=0.5 * a * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]]), pbc=True)
                block = np.stack([np.diag(rng.uniform(0.3, 1.0, 5)) for _ in range(2)])
                trace = float(np.trace(block, axis1=-2, axis2=-1).sum())
                u = LAW[metal][0] + LAW[metal][1] * trace
                key = (0, 1, 0, 0, 0)
                pair = rng.uniform(-0.1, 0.1, (2, 5, 3)) if with_v else None
                o_block = np.stack([np.eye(3) * 0.9] * 2)
                onsite = {0: block, 1: o_block} if with_v else {0: block}
                v = V_LAW[0] + V_LAW[1] * (trace + 5.4)
                name = f"{material}_s{round(strain * 100)}_iter{iteration:02d}"
                samples.append(hubbard_record_sample(
                    atoms, onsite, {0: u_in, 1: 0.0} if with_v else {0: u_in}, target_u={0: u},
                    intersite={key: pair} if with_v else None, hubbard_v_scf={key: v_in} if with_v else None,
                    target_v={key: v} if with_v else None,
                    info={"name": name, "material": material, "strain": strain, "iteration": iteration,
                          "campaign_key": name.rsplit("_iter", 1)[0],
                          **(_gapped(0.0) if name == metal_sample else _gapped())}))
                u_in, v_in = u, v
    return Dataset(samples, HUBBARD_TARGET_SPECS)


@pytest.fixture(scope="module")
def record():
    return synthetic_record(metal_sample="MnO-rocksalt-fm_s102_iter02")


def test_quality_filter_flags_the_metal_and_its_labels_are_never_scored_or_trained_on(record):
    flags = ev.label_flags(record)
    flagged = [record.samples[i].info["name"] for i in flags]
    assert flagged == ["MnO-rocksalt-fm_s102_iter02"] and "metallic" in " ".join(flags[next(iter(flags))])
    rows = ev.label_table(record, None, flags)
    assert not any(r["sample"] in flags for r in rows)
    for split in ev.material_splits(record, flags):
        assert not set(flags) & (set(split["train"]) | set(split["test"]))
    # a sample without scf diagnostics (an old record) is flagged, not an error
    atoms = ase.Atoms("NiO", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.eye(3) * 3.0, pbc=True)
    bare = hubbard_record_sample(atoms, {0: np.stack([np.eye(5)] * 2)}, {0: 5.0}, target_u={0: 6.0}, info={"name": "x"})
    assert "no scf diagnostics" in ev.label_flags(Dataset([bare], HUBBARD_TARGET_SPECS))[0][0]


def test_leave_one_material_out_never_trains_on_the_held_out_material(record):
    flags = ev.label_flags(record)
    splits = ev.material_splits(record, flags)
    materials = sorted({ev.material_of(s) for s in record.samples})
    assert [s["material"] for s in splits] == materials  # each material held out exactly once
    usable = set(range(len(record))) - set(flags)
    for split in splits:
        held = split["material"]
        assert split["test"] and all(ev.material_of(record.samples[i]) == held for i in split["test"])
        assert all(ev.material_of(record.samples[i]) != held for i in split["train"])
        assert set(split["train"]) | set(split["test"]) == usable and not set(split["train"]) & set(split["test"])
        fit, val, unit = ev.validation_split(record, split["train"], 0.5, seed=1)
        assert unit == "material" and val and fit
        assert not {ev.material_of(record.samples[i]) for i in fit} & {ev.material_of(record.samples[i]) for i in val}
        assert sorted(fit + val) == sorted(split["train"])
    only = ev.material_splits(record, flags, ["CoO-rocksalt-fm"])
    assert [s["material"] for s in only] == ["CoO-rocksalt-fm"]
    with pytest.raises(ValueError, match="no usable label"):
        ev.material_splits(record, flags, ["FeO-rocksalt-fm"])


def test_validation_falls_back_to_cells_then_none(record):
    ni = [i for i, s in enumerate(record.samples) if ev.material_of(s) == "NiO-rocksalt-fm"]
    fit, val, unit = ev.validation_split(record, ni, 0.5)
    assert unit == "cell" and {ev.cell_of(record.samples[i]) for i in fit}.isdisjoint(
        {ev.cell_of(record.samples[i]) for i in val}
    )
    one_cell = [i for i in ni if record.samples[i].info["strain"] == 0.98]
    assert ev.validation_split(record, one_cell, 0.5) == (one_cell, [], "none")


def test_validation_draws_a_v_material_and_leaves_one_to_fit():
    """With V labels on two of five materials, every seeded draw (a quarter, or most, of the materials) validates on
    one V material and fits on the other: a V option is never judged on U alone, nor fitted without V."""
    five = (*MATERIALS[:2], ("CoO-rocksalt-fm", "Co", True), ("FeO-rocksalt-fm", "Fe", False),
            ("NiO-rocksalt-afm2", "Ni", False))
    record = synthetic_record(materials=five)
    train = list(range(len(record)))
    v_materials = {"NiO-rocksalt-fm", "CoO-rocksalt-fm"}
    for fraction in (0.25, 0.8):
        for seed in range(12):
            fit, val, unit = ev.validation_split(record, train, fraction, seed=seed)
            in_val = {ev.material_of(record.samples[i]) for i in val}
            in_fit = {ev.material_of(record.samples[i]) for i in fit}
            assert unit == "material" and sorted(fit + val) == train and not in_val & in_fit
            assert in_val & v_materials and in_fit & v_materials, (fraction, seed, in_val)
            assert len(in_val) == min(4, max(1, round(fraction * 5)))
    # one V material only: it may fall on either side (nothing to balance), the draw is unchanged
    record = synthetic_record()
    assert ev.validation_split(record, list(range(len(record))), 0.34, seed=3)[2] == "material"


def test_previous_iteration_baseline_is_exactly_the_scf_value(record):
    rows = ev.label_table(record)
    predict = ev.previous_iteration_baseline(rows)
    for r in rows:
        s = record.samples[r["sample"]]
        if r["kind"] == "U":
            assert predict(r) == s.node_attrs["hubbard_u_scf"][r["key"][0]]
        else:
            attr = s.edge_attrs["hubbard_v_scf"]
            where = [k for k, key in enumerate(attr.keys.tolist()) if tuple(key) == r["key"]]
            assert predict(r) == attr.values[where[0], 0]
    assert {r["kind"] for r in rows} == {"U", "V"} and sum(r["kind"] == "V" for r in rows) == 4
    # iteration 2 starts from iteration 1's hp.x value
    first = next(r for r in rows if r["kind"] == "U" and record.samples[r["sample"]].info["iteration"] == 1)
    second = next(r for r in rows if r["kind"] == "U" and r["sample"] == first["sample"] + 1)
    assert predict(second) == pytest.approx(first["truth"])


def test_element_mean_and_occupation_linear_baselines(record):
    flags = ev.label_flags(record)
    split = next(s for s in ev.material_splits(record, flags) if s["material"] == "CoO-rocksalt-fm")
    train, test = ev.label_table(record, split["train"], flags), ev.label_table(record, split["test"], flags)
    mean = ev.element_mean_baseline(train)
    ni = [r["truth"] for r in train if r["group"] == "Ni" and r["kind"] == "U"]
    assert mean({"kind": "U", "group": "Ni"}) == pytest.approx(np.mean(ni))
    # Co is unseen: the mean of every training U, not some other element's
    assert mean(test[0]) == pytest.approx(np.mean([r["truth"] for r in train if r["kind"] == "U"]))
    assert mean({"kind": "V", "group": "Ni-O"}) == pytest.approx(
        np.mean([r["truth"] for r in train if r["kind"] == "V"])
    )
    line = ev.occupation_linear_baseline(train)
    for r in ev.label_table(record, None, flags):  # the law is linear per element: recovered exactly where fitted
        if r["group"] in ("Ni", "Mn", "Ni-O"):
            assert line(r) == pytest.approx(r["truth"], abs=1e-9)
    assert line(test[0]) == pytest.approx(mean(test[0]))  # unseen element: the mean, not an extrapolated line
    scores = ev.pooled_errors([{**r, "p": line(r)} for r in ev.label_table(record, split["train"], flags)], "p")
    assert scores["U"]["mae"] == pytest.approx(0.0, abs=1e-9) and scores["V"]["n"] == 4


def test_errors():
    e = ev.errors([2.0, 4.0], [2.2, 3.0])
    assert e["n"] == 2 and e["mae"] == pytest.approx(0.6) and e["mare"] == pytest.approx((0.1 + 0.25) / 2)
    assert ev.errors([], [])["mae"] is None


@pytest.mark.skipif(not OLD_RECORD.exists(), reason="docs/benchmarks/hubbard_labels.npz not in this checkout")
def test_on_the_real_older_record():
    record = Dataset.load(OLD_RECORD)
    materials = {ev.material_of(s) for s in record.samples}
    assert materials == {f"{m}O-rocksalt-fm" for m in ("Co", "Fe", "Mn", "Ni")} | {"NiO-rocksalt-afm2"}
    flags = ev.label_flags(record)
    rows = ev.label_table(record, None, flags)
    assert len(flags) == 48 and len(rows) == 13  # the 60 Ry NiO / MnO insulators and AFM NiO at 30 Ry
    predict = ev.previous_iteration_baseline()
    assert all(predict(r) == record.samples[r["sample"]].node_attrs["hubbard_u_scf"][r["key"][0]] for r in rows)
    for split in ev.material_splits(record, flags):
        assert split["material"] not in {ev.material_of(record.samples[i]) for i in split["train"]}


@pytest.mark.skipif(not any(CAMPAIGN.glob("*.npz")), reason="no campaign labels exported yet")
def test_campaign_labels_have_materials_and_pass_through():
    record = Dataset([s for f in sorted(CAMPAIGN.glob("*.npz")) for s in Dataset.load(f).samples], HUBBARD_TARGET_SPECS)
    for s in record.samples:
        assert ev.material_of(s) == s.info["material"] and ev.cell_of(s) == s.info["campaign_key"]
    rows = ev.label_table(record, None, ev.label_flags(record))
    assert rows and all(np.isfinite(r["truth"]) and np.isfinite(r["trace"]) for r in rows)


def test_symmetry_distinct_v_couples_of_real_hp_runs():
    """Rutile has two Ti-O bond lengths (4 equatorial, 2 apical per Ti): hp.x's 8 couples of TiO2 are 2 classes;
    in AFM MnO2 the two Mn sublattices differ by their moment, so the same shell gives 4."""
    from pathlib import Path

    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.evaluation import distinct_v_couples

    data = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "hubbard_campaign"
    tio2 = Dataset.load(data / "TiO2_rutile_s100.npz").samples[0]
    mno2 = Dataset.load(data / "MnO2_rutile_afm_s100.npz").samples[0]
    assert len(tio2.edge_targets["hubbard_v"].keys) == 8 and distinct_v_couples(tio2) == 2
    assert len(mno2.edge_targets["hubbard_v"].keys) == 8 and distinct_v_couples(mno2) == 4
    nio = Dataset.load(data / "NiO_rocksalt_afm2_s100.npz").samples[0]  # U only
    assert distinct_v_couples(nio) == 0


def test_unseen_species_counts_elements_without_labels():
    """The loop refuses a structure with an element its models never saw, labelled or not: a held-out SrTiO3-like
    material whose A cation no training material has is outside the domain although its Ti U is known."""
    from aiida_eqml.ml.hubbard.evaluation import material_splits, unseen_species

    record = synthetic_record()
    splits = {s["material"]: s for s in material_splits(record, {})}
    assert all(unseen_species(record, s["train"], s["test"]) == ["Co"] for m, s in splits.items() if m.startswith("Co"))
    assert unseen_species(record, splits["NiO-rocksalt-fm"]["train"], splits["NiO-rocksalt-fm"]["test"]) == ["Ni"]
    # a spectator element (no Hubbard label) only in the held-out material: unseen; in a training material: seen
    import dataclasses

    test = dataclasses.replace(record.samples[0], numbers=np.array([28, 38]))  # Ni (labelled) + Sr (spectator)
    extended = Dataset([*record.samples, test], HUBBARD_TARGET_SPECS, validate=False)
    held_out = [len(record)]
    assert unseen_species(extended, range(len(record)), held_out) == ["Sr"]
    assert unseen_species(extended, [*range(len(record)), len(record)], held_out) == []


def test_each_target_is_chosen_on_its_own_validation_score():
    """A candidate that is better on V but worse on U is V's choice only (the mean of both scores, the selection
    until the fourteenth session, took it for both: here 0.5 + 0.3 < 0.2 + 0.9); unscored candidates are skipped,
    and with no finite score the first candidate stands."""
    candidates = [
        {"size": "tiny", "val_mare_u": 0.2, "val_mare_v": 0.9},
        {"size": "small", "val_mare_u": 0.5, "val_mare_v": 0.3},
        {"size": "medium", "val_mare_u": float("nan"), "val_mare_v": None},
    ]
    assert ev.choose_per_target(candidates) == {"U": 0, "V": 1}
    assert ev.choose_per_target([{"val_mare_u": None, "val_mare_v": float("nan")}] * 2) == {"U": 0, "V": 0}
    only_u = [{"val_mare_u": 0.4, "val_mare_v": None}, {"val_mare_u": 0.1, "val_mare_v": None}]
    assert ev.choose_per_target(only_u) == {"U": 1, "V": 0}
