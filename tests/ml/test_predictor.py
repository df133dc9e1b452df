"""The Predictor and the ASE calculator: one jitted path, Cartesian outputs, ensembles, checks with clear messages."""

import ase
import jax
import numpy as np
import pytest

from aiida_eqml.ml.calculator import EqmlCalculator
from aiida_eqml.ml.graph import PaddingBuckets, graph_from_atoms
from aiida_eqml.ml.modelfile import save_model
from aiida_eqml.ml.models import build_model
from aiida_eqml.ml.predict import PredictionError, cached_predictor, load_predictor

#: every kind of head the calculator exposes: energy / forces / stress from E(R), direct Cartesian tensors
MODEL = {
    "species": ["O", "Ti"],
    "cutoff": 3.0,
    "num_layers": 1,
    "hidden_irreps": "8x0e + 4x0o + 4x1o + 4x1e + 4x2e + 2x2o + 2x3o",
    "radial_hidden": [16],
    "num_radial_basis": 6,
    "heads": {
        "energy": {"level": "graph", "irreps": "0e"},
        "forces": {"route": "derivative"},
        "stress": {"route": "derivative"},
        "born_charges": {"level": "node", "tensor": "ij"},
        "dielectric": {"level": "graph", "tensor": "ij=ji", "reduce": "mean"},
        "raman": {"level": "node", "tensor": "ijk=jik"},
    },
}


def tio(seed=0, n_atoms=4):
    """A small triclinic Ti-O cell with random positions (no two atoms closer than 1 A)."""
    rng = np.random.default_rng(seed)
    cell = 3.4 * (np.eye(3) + 0.15 * rng.normal(size=(3, 3)))
    while True:
        symbols = ["Ti" if i % 3 == 0 else "O" for i in range(n_atoms)]
        atoms = ase.Atoms(symbols, scaled_positions=rng.uniform(size=(n_atoms, 3)), cell=cell, pbc=True)
        distances = atoms.get_all_distances(mic=True)[np.triu_indices(n_atoms, 1)]
        if distances.min() > 1.0:
            return atoms


def random_rotation(seed, improper):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r)) * np.sign(np.linalg.det(q * np.sign(np.diag(r))))  # proper
    return -q if improper else q


def model_file(path, config, seed, atoms=None):
    model = build_model(config)
    atoms = tio() if atoms is None else atoms
    graph = graph_from_atoms(atoms, model.config["cutoff"], model.species, node_attrs=_attrs(model, atoms))
    params = model.init(jax.random.PRNGKey(seed), PaddingBuckets()([graph]))
    save_model(path, model.config, params, {"seed": seed})
    return path


def _attrs(model, atoms):
    import e3nn_jax as e3nn

    return {
        name: e3nn.IrrepsArray(irreps, np.ones((len(atoms), e3nn.Irreps(irreps).dim)))
        for name, irreps in model.config["node_attrs"].items()
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return [model_file(root / f"m{seed}.eqml", MODEL, seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def single(files):
    return load_predictor(files[0])


def test_outputs_are_cartesian_with_the_physics_of_each_head(single):
    atoms = tio(1)
    out = single.predict(atoms)
    assert out["energy"].shape == (1,) and out["forces"].shape == (4, 3) and out["stress"].shape == (3, 3)
    assert (
        out["born_charges"].shape == (4, 3, 3)
        and out["raman"].shape == (4, 3, 3, 3)
        and out["dielectric"].shape == (3, 3)
    )
    assert not any(k.endswith("_std") for k in out)  # one model: no spread
    np.testing.assert_allclose(out["dielectric"], out["dielectric"].T, atol=1e-6)
    np.testing.assert_allclose(out["raman"], out["raman"].transpose(0, 2, 1, 3), atol=1e-6)  # ijk = jik
    np.testing.assert_allclose(out["forces"].sum(axis=0), 0.0, atol=1e-4)  # translation invariance of E
    assert np.abs(out["born_charges"]).max() > 1e-3 and np.abs(out["forces"]).max() > 1e-4

    # forces are -dE/dR: a finite difference of the Predictor's own energy
    step, atom, axis = 1e-3, 1, 2
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[atom, axis] += step
    minus.positions[atom, axis] -= step
    fd = -(single.predict(plus)["energy"][0] - single.predict(minus)["energy"][0]) / (2 * step)
    assert fd == pytest.approx(out["forces"][atom, axis], rel=2e-2, abs=2e-4)

    # a list gives the same numbers as one structure at a time (another padding, float32 rounding)
    many = single.predict([atoms, tio(2), tio(3, 5)])
    for name in ("energy", "forces", "born_charges", "dielectric"):
        np.testing.assert_allclose(many[0][name], out[name], rtol=1e-5, atol=1e-6)
    assert many[2]["forces"].shape == (5, 3)


def test_ensemble_mean_and_population_std(files, single):
    ensemble = load_predictor(files)
    assert len(ensemble) == 2
    atoms = tio(4)
    members = [single.predict(atoms), load_predictor(files[1]).predict(atoms)]
    out = ensemble.predict(atoms)
    for name in ("energy", "forces", "born_charges", "raman", "dielectric", "stress"):
        stack = np.stack([m[name] for m in members])
        np.testing.assert_allclose(out[name], stack.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[f"{name}_std"], stack.std(0), rtol=1e-4, atol=1e-6)
    assert out["born_charges_std"].max() > 1e-4  # two seeds disagree
    per_member = ensemble.predict(atoms, members=True)
    assert per_member["forces"].shape == (2, 4, 3)


def test_equivariance_under_proper_and_improper_rotations(single):
    atoms = tio(5)
    ref = single.predict(atoms)
    for seed, improper in ((0, False), (1, True)):
        rot = random_rotation(seed, improper)
        moved = ase.Atoms(atoms.numbers, positions=atoms.positions @ rot.T, cell=atoms.cell[:] @ rot.T, pbc=True)
        out = single.predict(moved)
        np.testing.assert_allclose(out["energy"], ref["energy"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["forces"], ref["forces"] @ rot.T, atol=2e-5)
        np.testing.assert_allclose(out["stress"], rot @ ref["stress"] @ rot.T, atol=2e-5)
        np.testing.assert_allclose(out["born_charges"], rot @ ref["born_charges"] @ rot.T, atol=2e-5)  # Z' = R Z R^T
        np.testing.assert_allclose(out["dielectric"], rot @ ref["dielectric"] @ rot.T, atol=2e-5)
        np.testing.assert_allclose(
            out["raman"], np.einsum("ia,jb,kc,nabc->nijk", rot, rot, rot, ref["raman"]), atol=2e-5
        )
    # the check has teeth: the unrotated tensors are far from the rotated ones
    assert np.abs(out["born_charges"] - ref["born_charges"]).max() > 1e-3


def test_one_compilation_per_bucket_never_per_call(files):
    predictor = load_predictor(files[1])
    atoms = tio(6)
    predictor.predict(atoms)
    first = predictor.trace_count
    assert first >= 1
    rng = np.random.default_rng(0)
    for _ in range(6):  # same bucket: moved atoms, same count
        moved = atoms.copy()
        moved.positions += rng.normal(0, 0.01, moved.positions.shape)
        predictor.predict(moved)
    assert predictor.trace_count == first
    # another predictor of the same config shares the compiled function (what a daemon loop relies on)
    again = load_predictor(files[0])
    again.predict(atoms)
    assert again.trace_count == first
    # a structure of another size is another bucket: exactly one more trace, then none
    bigger = tio(7, 10)
    predictor.predict(bigger)
    assert predictor.trace_count == first + 1
    predictor.predict(bigger)
    assert predictor.trace_count == first + 1


def test_cached_predictor_loads_once(files):
    calls = []

    def load():
        calls.append(1)
        return load_predictor(files[0])

    a = cached_predictor(["sha-a"], load)
    b = cached_predictor(["sha-a"], load)
    assert a is b and len(calls) == 1
    assert load_predictor(files[0], cache=True) is load_predictor(files[0], cache=True)


def test_unknown_species_and_missing_attributes_are_named(tmp_path, single):
    foreign = ase.Atoms("BaTiO", positions=[[0, 0, 0], [1.5, 1.5, 1.5], [0, 1.5, 1.5]], cell=3.0 * np.eye(3), pbc=True)
    with pytest.raises(
        PredictionError, match=r"element\(s\) \['Ba'\] not in the model's species \['O', 'Ti'\]"
    ) as info:
        single.predict(foreign)
    assert info.value.field == "species" and info.value.value == ["Ba"]
    with pytest.raises(PredictionError, match=r"structure 1: element\(s\) \['Ba'\]"):
        single.predict([tio(1), foreign])

    config = {
        **MODEL,
        "node_attrs": {"magmom": "0e + 1o"},
        "heads": {"born_charges": {"level": "node", "tensor": "ij"}},
    }
    predictor = load_predictor(model_file(tmp_path / "attr.eqml", config, 0))
    atoms = tio(2)
    with pytest.raises(
        PredictionError, match=r"needs node attribute 'magmom' \(0e \+ 1o: \[4, 4\] .*given: none"
    ) as info:
        predictor.predict(atoms)
    assert info.value.field == "node_attrs.magmom"
    with pytest.raises(PredictionError, match=r"'magmom' has shape \(4, 3\), the model needs \[4, 4\]"):
        predictor.predict(atoms, node_attrs={"magmom": np.zeros((4, 3))})
    values = np.random.default_rng(0).normal(size=(4, 4))
    given = predictor.predict(atoms, node_attrs={"magmom": values})["born_charges"]
    atoms.arrays["magmom"] = values  # the same attribute from the Atoms' own arrays
    np.testing.assert_allclose(predictor.predict(atoms)["born_charges"], given)
    assert np.abs(predictor.predict(atoms, node_attrs={"magmom": 2 * values})["born_charges"] - given).max() > 1e-5


def test_calculator_exposes_every_head_with_ase_conventions(files, single):
    atoms = tio(8)
    ref = single.predict(atoms)
    atoms.calc = EqmlCalculator(single)
    assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"][0]), rel=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-6)
    s = ref["stress"]
    np.testing.assert_allclose(
        atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(atoms.calc.get_property("born_charges"), ref["born_charges"], rtol=1e-6)
    np.testing.assert_allclose(atoms.calc.results["raman"], ref["raman"], rtol=1e-6)
    np.testing.assert_allclose(atoms.calc.results["dielectric"], ref["dielectric"], rtol=1e-6)

    ensemble = EqmlCalculator(files)  # paths work too
    atoms.calc = ensemble
    atoms.get_potential_energy()
    for name in ("energy", "forces", "stress", "born_charges", "dielectric", "raman"):
        assert f"{name}_std" in ensemble.results, name
    assert ensemble.results["forces_std"].shape == (4, 3) and ensemble.results["stress_std"].shape == (6,)
    # moving an atom invalidates the results (ASE's check_state), so the next call predicts again
    before = atoms.get_forces().copy()
    atoms.positions[0] += 0.05
    assert np.abs(atoms.get_forces() - before).max() > 1e-5


def test_ensemble_directory_and_directory_of_files(tmp_path, files):
    from aiida_eqml.ml.hubbard.ensemble import Ensemble
    from aiida_eqml.ml.modelfile import load_model

    members = [load_model(f) for f in files]
    Ensemble([(m, p) for m, p, _ in members], [{"seed": k} for k in range(2)]).save(tmp_path / "ens")
    atoms = tio(9)
    ref = load_predictor(files).predict(atoms)
    for source in (tmp_path / "ens", files[0].parent):
        out = load_predictor(source).predict(atoms)
        np.testing.assert_allclose(out["born_charges_std"], ref["born_charges_std"], rtol=1e-5, atol=1e-7)
    with open(tmp_path / "ens" / "member_01.eqml", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match="sha256 differs"):
        load_predictor(tmp_path / "ens")
    with pytest.raises(FileNotFoundError, match="no ensemble.json and no .eqml"):
        load_predictor(tmp_path)


def test_ensemble_of_members_with_other_cutoffs_and_an_edge_head(tmp_path):
    """A committee over hyper-parameters: members build their own graphs; edge values meet on the first's edges."""
    from aiida_eqml.ml.graph import match_edges

    base = {
        **MODEL,
        "heads": {"bond": {"level": "edge", "irreps": "0e"}, "born_charges": {"level": "node", "tensor": "ij"}},
    }
    short = load_predictor(model_file(tmp_path / "short.eqml", {**base, "cutoff": 2.6}, 0))
    long = load_predictor(model_file(tmp_path / "long.eqml", {**base, "cutoff": 3.2}, 1))
    both = load_predictor([tmp_path / "short.eqml", tmp_path / "long.eqml"])
    atoms = tio(10, 6)
    a, b, out = short.predict(atoms), long.predict(atoms), both.predict(atoms)
    assert len(b["bond_keys"]) > len(a["bond_keys"]) > 0  # the longer cutoff sees more edges
    np.testing.assert_array_equal(out["bond_keys"], a["bond_keys"])
    where = match_edges(b["bond_keys"][:, 0], b["bond_keys"][:, 1], b["bond_keys"][:, 2:], a["bond_keys"])
    assert np.all(where >= 0)
    np.testing.assert_allclose(out["bond"], (a["bond"] + b["bond"][where]) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["born_charges"], (a["born_charges"] + b["born_charges"]) / 2, rtol=1e-5, atol=1e-7)
