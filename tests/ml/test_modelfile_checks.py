"""Malformed model files: one sha256 over config, weights and metadata; every crafted payload a ModelFileError."""
import hashlib
import json

import jax
import msgpack
import numpy as np
import pytest
from flax import serialization
from test_training import MODEL, tiny_dataset

from aiida_eqml.ml.dataset import make_batches
from aiida_eqml.ml.modelfile import (
    ModelFileError,
    content_sha256,
    load_model,
    payload_sha256,
    read_model_file,
    save_model,
)
from aiida_eqml.ml.models import build_model

ENTRY = 'load_model (ML API)'
MAGIC = b'AIIDA-EQML-MODEL\n'


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    model = build_model({**MODEL, 'species': ['O', 'Ti']})
    params = model.init(jax.random.PRNGKey(0), make_batches(tiny_dataset(2), model.config, 2)[0].graph)
    path = tmp_path_factory.mktemp('model') / 'm.eqml'
    save_model(path, model.config, params, {'target_specs': {}})
    return path


def payload_of(path):
    return msgpack.unpackb(path.read_bytes()[len(MAGIC):], raw=False)


def write(path, payload):
    path.write_bytes(MAGIC + msgpack.packb(payload, use_bin_type=True))
    return path


def consistent(payload, config=None, metadata=None, params=None):
    """A payload whose hashes all match (what a buggy writer could produce): only the content checks can refuse it."""
    payload = dict(payload)
    config = json.loads(payload['config']) if config is None else config
    metadata = json.loads(payload['metadata']) if metadata is None else metadata
    blob = payload['params'] if params is None else serialization.msgpack_serialize(params)
    metadata['content_sha256'] = hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(',', ':')).encode() + blob
    ).hexdigest()
    payload.update(
        config=json.dumps(config, sort_keys=True), metadata=json.dumps(metadata, sort_keys=True), params=blob
    )
    payload['sha256'] = payload_sha256(2, payload['package_version'], payload['config'], payload['metadata'], blob)
    return payload


def test_a_changed_cutoff_or_metadata_fails_the_checksum(saved, tmp_path, reliability):
    payload = payload_of(saved)
    assert '"cutoff": 3.0' in payload['config']
    flipped = dict(payload, config=payload['config'].replace('"cutoff": 3.0', '"cutoff": 7.0'))
    error = reliability.raises(
        ENTRY,
        'one digit of the cutoff changed in the config',
        ModelFileError,
        load_model,
        write(tmp_path / 'c.eqml', flipped),
    )
    assert 'sha256' in str(error)
    metadata = json.loads(payload['metadata'])
    metadata['target_specs'] = {'born_charges': {'level': 'node', 'tensor': 'ij=ji'}}
    flipped = dict(payload, metadata=json.dumps(metadata, sort_keys=True))
    error = reliability.raises(
        ENTRY, 'metadata (target specs) changed', ModelFileError, load_model, write(tmp_path / 'm.eqml', flipped)
    )
    assert 'sha256' in str(error)


def test_a_version_1_file_still_loads_and_its_config_is_verified(saved, tmp_path):
    payload = payload_of(saved)
    v1 = {k: v for k, v in payload.items() if k != 'sha256'}
    v1.update(format_version=1, params_sha256=hashlib.sha256(payload['params']).hexdigest())
    config, _, _ = read_model_file(write(tmp_path / 'v1.eqml', v1))
    assert config['cutoff'] == 3.0
    load_model(tmp_path / 'v1.eqml')
    v1['config'] = v1['config'].replace('"cutoff": 3.0', '"cutoff": 7.0')
    with pytest.raises(ModelFileError, match='content_sha256'):
        load_model(write(tmp_path / 'v1bad.eqml', v1))


@pytest.mark.parametrize('name,change,text', [
    ('unknown architecture', {'architecture': 'transformer'}, 'architecture'),
    ('unknown config key', {'layers': 3}, 'unknown model config keys'),
    ('species "Xx"', {'species': ['O', 'Xx']}, 'chemical symbol'),
    ('negative cutoff', {'cutoff': -3.0}, 'cutoff'),
    ('more layers than weights', {'num_layers': 3}, 'modules missing'),
    ('num_layers -2', {'num_layers': -2}, 'num_layers'),
])
def test_consistent_files_with_an_invalid_config_are_refused(saved, tmp_path, reliability, name, change, text):
    payload = payload_of(saved)
    config = {**json.loads(payload['config']), **change}
    path = write(tmp_path / 'bad.eqml', consistent(payload, config=config))
    error = reliability.raises(ENTRY, f'config with {name} (hashes consistent)', ModelFileError, load_model, path)
    assert text in str(error)


@pytest.mark.parametrize('name,change,text', [
    ('params an integer 1e9', {'params': 10**9}, "entry 'params' is a int"),
    ('config a list', {'config': ['x']}, "entry 'config' is a list"),
    ('sha256 missing', {'sha256': None}, "entry 'sha256' is a NoneType"),
    ('format_version true', {'format_version': True}, 'format version True'),
])
def test_crafted_field_types_are_refused_without_allocating(saved, tmp_path, reliability, name, change, text):
    payload = {**payload_of(saved), **change}
    error = reliability.raises(ENTRY, name, ModelFileError, load_model, write(tmp_path / 'bad.eqml', payload))
    assert text in str(error)


def test_weights_that_are_not_float_arrays(saved, tmp_path, reliability):
    payload = consistent(payload_of(saved), params={'params': {'embedding': {'w': 1}}})
    error = reliability.raises(
        ENTRY,
        'weights holding an integer instead of arrays',
        ModelFileError,
        load_model,
        write(tmp_path / 'w.eqml', payload),
    )
    assert 'expected a float array' in str(error)
    payload = dict(payload_of(saved), params=b'\xc1' * 10)
    payload = consistent(payload)
    error = reliability.raises(
        ENTRY, 'weights blob not msgpack', ModelFileError, load_model, write(tmp_path / 'x.eqml', payload)
    )
    assert 'weights unreadable' in str(error)


def test_outer_payload_not_a_map(tmp_path, reliability):
    path = tmp_path / 'list.eqml'
    path.write_bytes(MAGIC + msgpack.packb([1, 2, 3]))
    error = reliability.raises(ENTRY, 'payload a msgpack list', ModelFileError, load_model, path)
    assert 'format' in str(error)
    path.write_bytes(MAGIC + b'\xdb\xff\xff\xff\xff')  # str32 declaring 4 GB, 0 bytes present
    reliability.raises(ENTRY, 'msgpack string header declaring 4 GB', ModelFileError, load_model, path)


def test_content_hash_unchanged_by_the_new_format(saved):
    config, params, metadata = read_model_file(saved)
    assert metadata['content_sha256'] == content_sha256(config, params)
    assert np.all(np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)])))
