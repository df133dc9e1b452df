"""The prediction calcfunctions are node <-> array glue over the Predictor: same numbers, one load per process."""
from __future__ import annotations

import numpy as np
import pytest
from conftest_train import ensure_entry_points, random_model_file
from test_predict import hubbard_model_node, nio_occupations, tio_structure  # noqa: F401  (fixture)


@pytest.fixture(scope='module')
def model_files(aiida_profile, tmp_path_factory):
    ensure_entry_points()
    folder = tmp_path_factory.mktemp('glue')
    return [random_model_file(folder / f'g{seed}.eqml', seed)[0] for seed in (3, 4)]


def test_predict_tensors_gives_the_predictor_numbers(model_files):
    from aiida_eqml.calculations.functions.predict import predict_tensors
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.calculator import EqmlCalculator
    from aiida_eqml.ml.predict import load_predictor

    nodes = [EqmlModelData(filepath=path).store() for path in model_files]
    structure = tio_structure()
    atoms = structure.get_ase()
    direct = load_predictor(model_files).predict(atoms)
    result = predict_tensors(structure, m0=nodes[0], m1=nodes[1])
    assert set(result.get_arraynames()) == set(direct)
    for name in direct:
        np.testing.assert_allclose(result.get_array(name), direct[name], rtol=1e-5, atol=1e-7)
    atoms.calc = EqmlCalculator(model_files)
    np.testing.assert_allclose(
        atoms.calc.get_property('born_charges', atoms), direct['born_charges'], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(atoms.calc.results['born_charges_std'], direct['born_charges_std'], rtol=1e-4, atol=1e-7)


def test_a_loop_of_predictions_loads_and_compiles_once(model_files, monkeypatch):
    """What the self-consistent ML Hubbard loop does: predict again and again with the same model node."""
    from aiida_eqml.calculations.functions import predict as module
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.predict import clear_predictor_cache

    node = EqmlModelData(filepath=model_files[0]).store()
    clear_predictor_cache()
    loads = []
    original = EqmlModelData.load
    monkeypatch.setattr(EqmlModelData, 'load', lambda self: loads.append(self.pk) or original(self))
    structure = tio_structure()
    first = module.predict_tensors(structure, model=node)
    predictor = module._predictor([node])
    traces = predictor.trace_count
    for _ in range(3):
        again = module.predict_tensors(structure, model=node)
        np.testing.assert_array_equal(again.get_array('born_charges'), first.get_array('born_charges'))
    assert loads == [node.pk]  # one load for four calcfunctions
    assert predictor.trace_count == traces  # and no new compilation


def test_predict_hubbard_gives_the_predictor_numbers(nio_occupations, tmp_path):  # noqa: F811
    from aiida_eqml.calculations.functions.predict import hubbard_record_from_nodes, predict_hubbard
    from aiida_eqml.ml.predict import Predictor

    structure, occupations = nio_occupations
    members = [hubbard_model_node(tmp_path, structure, occupations, seed) for seed in (5, 6)]
    result = predict_hubbard(structure, occupations, a=members[0], b=members[1])
    direct = Predictor([m.load() for m in members]).predict_hubbard(hubbard_record_from_nodes(structure, occupations))[
        0
    ]
    for entry in result['spread'].get_dict()['parameters']:
        i = entry['atom_index']
        assert entry['mean'] == pytest.approx(direct['hubbard_u'][i], rel=1e-5)
        assert entry['std'] == pytest.approx(direct['hubbard_u_std'][i], rel=1e-3, abs=1e-7)
        assert entry['std'] > 0
