"""``eqml.model`` / ``eqml.dataset`` nodes are made only from files that load: no unusable node is ever stored."""
from __future__ import annotations

import hashlib
import json

import msgpack
import numpy as np
import pytest
from conftest_train import random_model_file, tiny_dataset

MAGIC = b'AIIDA-EQML-MODEL\n'


def _count(cls) -> int:
    from aiida import orm

    return orm.QueryBuilder().append(cls).count()


def _with_config(path, target, **change):
    """The model file at ``path`` with its config changed and every hash recomputed (so only the content checks
    refuse it)."""
    from aiida_eqml.ml.modelfile import payload_sha256

    payload = msgpack.unpackb(path.read_bytes()[len(MAGIC):], raw=False)
    config = {**json.loads(payload['config']), **change}
    metadata = json.loads(payload['metadata'])
    metadata['content_sha256'] = hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(',', ':')).encode() + payload['params']
    ).hexdigest()
    payload.update(config=json.dumps(config, sort_keys=True), metadata=json.dumps(metadata, sort_keys=True))
    payload['sha256'] = payload_sha256(
        2, payload['package_version'], payload['config'], payload['metadata'], payload['params']
    )
    target.write_bytes(MAGIC + msgpack.packb(payload, use_bin_type=True))
    return target


@pytest.mark.parametrize('name,change', [
    ('more layers than weights', {'num_layers': 4}),
    ('species "Xx"', {'species': ['O', 'Xx']}),
    ('negative cutoff', {'cutoff': -1.0}),
    ('unknown architecture', {'architecture': 'gnn'}),
])
def test_model_node_refuses_files_that_load_model_rejects(aiida_profile, tmp_path, reliability, name, change):
    from aiida_eqml.data.model import EqmlModelData, ModelFileError

    good, _ = random_model_file(tmp_path / 'good.eqml')
    bad = _with_config(good, tmp_path / 'bad.eqml', **change)
    before = _count(EqmlModelData)
    error = reliability.raises(
        'EqmlModelData(filepath=...)',
        f'model file with {name} (hashes consistent)',
        ModelFileError,
        EqmlModelData,
        filepath=bad,
    )
    assert 'bad.eqml' in str(error)
    assert _count(EqmlModelData) == before
    EqmlModelData(filepath=good)  # the unchanged file still makes a node


def test_dataset_node_refuses_inconsistent_files(aiida_profile, tmp_path, reliability):
    import zipfile

    from aiida_eqml.data.dataset import DatasetError, EqmlDatasetData

    good = tmp_path / 'good.npz'
    tiny_dataset(3).save(good)
    with np.load(good) as data:
        arrays = {k: data[k] for k in data.files}
    arrays['n_atoms'] = arrays['n_atoms'] + np.array([1, 0, 0])
    bad = tmp_path / 'bad.npz'
    np.savez(bad, **arrays)
    before = _count(EqmlDatasetData)
    error = reliability.raises(
        'EqmlDatasetData(filepath=...)',
        'sum(n_atoms) differs from the atom arrays',
        DatasetError,
        EqmlDatasetData,
        filepath=bad,
    )
    assert 'bad.npz' in str(error) and 'numbers' in str(error)
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(good.read_bytes()[:300])
    reliability.raises(
        'EqmlDatasetData(filepath=...)', 'truncated .npz', DatasetError, EqmlDatasetData, filepath=truncated
    )
    assert _count(EqmlDatasetData) == before
    with zipfile.ZipFile(good, 'a') as archive:  # a stray member: ignored, and not part of the content hash
        archive.writestr('stray.npy', b'\x00' * 1000)
    node = EqmlDatasetData(filepath=good)
    assert node.n_samples == 3
