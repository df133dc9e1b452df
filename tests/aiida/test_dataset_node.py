"""The ``eqml.dataset`` Data plugin: storage, queryable attributes, round trip, dedup, extxyz export."""
from __future__ import annotations

import numpy as np
import pytest

from aiida_eqml.ml.dataset import DATASET_SCHEMA_VERSION, Dataset, EdgeValues, Sample

SPECS = {
    'born_charges': {'level': 'node', 'tensor': 'ij', 'unit': 'e'},
    'dielectric': {'level': 'graph', 'tensor': 'ij=ji', 'unit': '1'},
    'hubbard_v': {'level': 'edge', 'irreps': '0e', 'unit': 'eV'},
}


@pytest.fixture
def eqml_entry_points(entry_points):
    """Register ``aiida.data:eqml.dataset`` for this test unless the installed package already does."""
    from aiida.plugins.entry_point import get_entry_point_names

    if 'eqml.dataset' not in get_entry_point_names('aiida.data'):
        entry_points.add('aiida_eqml.data.dataset:EqmlDatasetData', 'aiida.data:eqml.dataset')
    return entry_points


def make_dataset(seed: int = 0, n_samples: int = 3) -> Dataset:
    """Rocksalt-like 2-atom cells with node, graph and edge labels (random numbers: this tests storage only)."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(n_samples):
        cell = 2.1 * (np.ones((3, 3)) - np.eye(3))
        positions = np.array([[0.0, 0.0, 0.0], [2.1, 2.1, 2.1]]) + 0.05 * rng.normal(size=(2, 3))
        dielectric = np.eye(3) * 3.0 + 0.01 * rng.normal(size=(3, 3))
        born = rng.normal(size=(2, 3, 3))
        born[1] = -born[0]
        samples.append(
            Sample(
                numbers=[12, 8],
                positions=positions,
                cell=cell,
                pbc=[True, True, True],
                node_targets={'born_charges': born},
                graph_targets={'dielectric': 0.5 * (dielectric + dielectric.T)},
                edge_targets={'hubbard_v': EdgeValues(keys=[[0, 1, 0, 0, 0], [0, 1, -1, 0, 0]], values=[[0.9], [0.8]])},
                info={'name': f'sample_{index}'},
            )
        )
    return Dataset(samples, SPECS)


def test_store_attributes_and_round_trip(aiida_profile, eqml_entry_points):
    from aiida import orm

    from aiida_eqml.data.dataset import EqmlDatasetData

    dataset = make_dataset()
    node = EqmlDatasetData(dataset).store()

    loaded = orm.load_node(node.pk)
    assert isinstance(loaded, EqmlDatasetData)
    assert loaded.schema_version == DATASET_SCHEMA_VERSION
    assert loaded.n_samples == 3
    assert loaded.n_atoms == 6
    assert loaded.target_names == ['born_charges', 'dielectric', 'hubbard_v']
    assert loaded.base.attributes.get('target_levels') == {
        'born_charges': 'node',
        'dielectric': 'graph',
        'hubbard_v': 'edge',
    }
    assert loaded.target_specs == SPECS
    assert loaded.species == ['O', 'Mg']  # sorted by atomic number
    assert len(loaded.sha256) == 64
    assert loaded.base.repository.list_object_names() == ['dataset.npz']

    back = loaded.get_dataset()
    assert len(back) == 3
    for before, after in zip(dataset.samples, back.samples):
        np.testing.assert_array_equal(before.numbers, after.numbers)
        np.testing.assert_allclose(before.positions, after.positions, rtol=0, atol=0)
        np.testing.assert_allclose(
            before.node_targets['born_charges'], after.node_targets['born_charges'], rtol=0, atol=0
        )
        np.testing.assert_allclose(
            before.graph_targets['dielectric'], after.graph_targets['dielectric'], rtol=0, atol=0
        )
        np.testing.assert_array_equal(before.edge_targets['hubbard_v'].keys, after.edge_targets['hubbard_v'].keys)
        assert after.info['name'] == before.info['name']


def test_attributes_are_queryable(aiida_profile, eqml_entry_points):
    from aiida import orm

    from aiida_eqml.data.dataset import EqmlDatasetData

    node = EqmlDatasetData(make_dataset(seed=11, n_samples=5)).store()
    query = orm.QueryBuilder().append(
        EqmlDatasetData,
        filters={
            'attributes.n_samples': 5,
            'attributes.sha256': node.sha256,
            'attributes.target_levels.hubbard_v': 'edge',
        },
        project='id',
    )
    assert query.all(flat=True) == [node.pk]


def test_get_or_create_deduplicates_identical_content(aiida_profile, eqml_entry_points, tmp_path):
    from aiida_eqml.data.dataset import EqmlDatasetData, dataset_content_sha256

    first = EqmlDatasetData.get_or_create(make_dataset(seed=3))
    assert first.is_stored
    # The same content saved again: the zip bytes carry timestamps, the content hash does not.
    make_dataset(seed=3).save(tmp_path / 'a.npz')
    assert dataset_content_sha256(tmp_path / 'a.npz') == first.sha256
    again = EqmlDatasetData.get_or_create(make_dataset(seed=3))
    assert again.pk == first.pk
    from_file = EqmlDatasetData.get_or_create(Dataset.load(tmp_path / 'a.npz'))
    assert from_file.pk == first.pk

    other = EqmlDatasetData.get_or_create(make_dataset(seed=4))
    assert other.pk != first.pk
    assert other.sha256 != first.sha256


def test_export_extxyz(aiida_profile, eqml_entry_points, tmp_path):
    import ase.io

    from aiida_eqml.data.dataset import EqmlDatasetData

    dataset = make_dataset(seed=5)
    node = EqmlDatasetData(dataset).store()
    path = tmp_path / 'labels.extxyz'
    node.export_extxyz(path)
    frames = ase.io.read(path, index=':')
    assert len(frames) == 3
    for frame, sample in zip(frames, dataset.samples):
        np.testing.assert_allclose(frame.positions, sample.positions, atol=1e-6)
        np.testing.assert_allclose(
            frame.arrays['born_charges'].reshape(2, 3, 3), sample.node_targets['born_charges'], atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(frame.info['dielectric']).reshape(3, 3), sample.graph_targets['dielectric'], atol=1e-6
        )


def test_bad_inputs_are_rejected(aiida_profile, tmp_path):
    from aiida_eqml.data.dataset import EqmlDatasetData

    with pytest.raises(ValueError, match='exactly one of'):
        EqmlDatasetData()
    with pytest.raises(TypeError, match='must be an aiida_eqml.ml.dataset.Dataset'):
        EqmlDatasetData({'not': 'a dataset'})
    junk = tmp_path / 'junk.npz'
    np.savez(junk, x=np.zeros(3))
    with pytest.raises(ValueError, match="no 'metadata' entry"):
        EqmlDatasetData(filepath=junk)
    text = tmp_path / 'text.npz'
    text.write_text('hello')
    with pytest.raises(ValueError, match='not a readable aiida-eqml dataset file'):
        EqmlDatasetData(filepath=text)
