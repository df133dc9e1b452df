"""``eqml.model``: attributes, deduplication by content hash, round trip, corrupt files refused."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest_train import TINY_MODEL, ensure_entry_points


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    """A real model file (random weights, no training needed) with metrics in its metadata."""
    import jax
    from conftest_train import tiny_dataset

    from aiida_eqml.ml.dataset import make_batches
    from aiida_eqml.ml.modelfile import save_model
    from aiida_eqml.ml.models import build_model

    config = {**TINY_MODEL, 'species': ['O', 'Ti']}
    model = build_model(config)
    dataset = tiny_dataset(2)
    batch = make_batches(dataset, model.config, 2)[0]
    params = model.init(jax.random.PRNGKey(0), batch.graph)
    path = tmp_path_factory.mktemp('model') / 'model.eqml'
    metrics = {'test': {'born_charges': {'mae': 0.12, 'rmse': float('nan'), 'per_species': {'O': {'mae': 0.1}}}}}
    save_model(path, model.config, params, {'metrics': metrics, 'target_specs': dataset.target_specs, 'best_epoch': 7})
    return path, batch


def test_attributes_and_round_trip(aiida_profile, model_file, tmp_path):
    import jax

    from aiida_eqml.data.model import EqmlModelData

    ensure_entry_points()
    path, batch = model_file
    node = EqmlModelData(filepath=path).store()
    assert node.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert node.species == ['O', 'Ti']
    assert node.targets == ['born_charges', 'dielectric']
    assert node.heads['dielectric'] == {'level': 'graph', 'irreps': '1x0e+1x2e'}
    assert node.architecture == 'nequip' and node.cutoff == 3.0
    assert node.base.attributes.get('best_epoch') == 7
    # NaN is not JSON: stored as None, the rest intact.
    assert node.test_metrics['born_charges']['mae'] == 0.12
    assert node.test_metrics['born_charges']['rmse'] is None
    assert len(node.content_sha256) == 64

    # The stored model predicts exactly what the original weights predict.
    model, params, metadata = node.load()
    from aiida_eqml.ml.modelfile import load_model

    model0, params0, _ = load_model(path)
    out, out0 = model.apply(params, batch.graph), model0.apply(params0, batch.graph)
    np.testing.assert_array_equal(np.asarray(out['born_charges'].array), np.asarray(out0['born_charges'].array))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params0)

    exported = tmp_path / 'exported.eqml'
    node.export(exported)
    assert exported.read_bytes() == path.read_bytes()


def test_queryable_and_deduplicated(aiida_profile, model_file):
    from aiida import orm

    from aiida_eqml.data.model import EqmlModelData

    ensure_entry_points()
    path, _ = model_file
    first = EqmlModelData.get_or_create(path)
    again = EqmlModelData.get_or_create(path)
    assert again.uuid == first.uuid
    hits = orm.QueryBuilder().append(
        EqmlModelData, filters={'attributes.species': {'contains': ['Ti']}, 'attributes.sha256': first.sha256}
    ).all(flat=True)
    assert first.uuid in {node.uuid for node in hits}
    # Loaded back from the database it is still an eqml.model (entry point registered).
    assert isinstance(orm.load_node(first.pk), EqmlModelData)


def test_corrupt_files_are_refused(aiida_profile, model_file, tmp_path):
    from aiida_eqml.data.model import EqmlModelData, ModelFileError

    path, _ = model_file
    data = bytearray(path.read_bytes())
    flipped = tmp_path / 'flipped.eqml'
    data[-200] ^= 0xFF  # inside the weights blob
    flipped.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match='corrupt'):
        EqmlModelData(filepath=flipped)
    truncated = tmp_path / 'truncated.eqml'
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match='corrupt or truncated|corrupt'):
        EqmlModelData(filepath=truncated)
    foreign = tmp_path / 'foreign.eqml'
    foreign.write_bytes(b'PK\x03\x04 not a model')
    with pytest.raises(ModelFileError, match='bad magic header'):
        EqmlModelData(filepath=foreign)
    with pytest.raises(ValueError, match='needs `filepath`'):
        EqmlModelData()


def test_species_check_names_the_unknown_element(aiida_profile, model_file):
    from aiida_eqml.data.model import EqmlModelData

    node = EqmlModelData(filepath=model_file[0])
    node.check_species(['Ti', 'O', 'O'])
    with pytest.raises(
        ValueError, match=r"trained on species \['O', 'Ti'\]; it cannot predict for element\(s\) \['Ba'\]"
    ):
        node.check_species(['Ba', 'Ti', 'O'])
