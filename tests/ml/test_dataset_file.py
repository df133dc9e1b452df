"""Malformed dataset files: every fault a DatasetError naming file, field and value; only expected members read."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from test_dataset import SPECS, _sample

from aiida_eqml.ml.dataset import Dataset
from aiida_eqml.ml.dataset_file import DatasetError, dataset_sha256, read_dataset_arrays

ENTRY = 'Dataset.load (ML API)'


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    dataset = Dataset([_sample(rng, n, f's{i}', with_edges=i != 1) for i, n in enumerate((3, 4, 2))], SPECS)
    path = tmp_path / 'good.npz'
    dataset.save(path)
    return path


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def rewrite(source, target, replace=None, drop=(), extra=None, raw=None):
    """Copy the npz ``source`` to ``target`` with members replaced (arrays), dropped, added or given as raw bytes."""
    replace, extra, raw = dict(replace or {}), dict(extra or {}), dict(raw or {})
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, 'w', zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename[:-4]
            if name in drop:
                continue
            if name in raw:
                zout.writestr(info.filename, raw.pop(name))
            elif name in replace:
                zout.writestr(info.filename, _npy(replace.pop(name)))
            else:
                zout.writestr(info.filename, zin.read(info))
        for name, array in extra.items():
            zout.writestr(f'{name}.npy', _npy(array))
        for name, data in raw.items():
            zout.writestr(f'{name}.npy', data)
    return target


def arrays_of(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_n_atoms_that_do_not_add_up_to_the_atom_arrays(good, tmp_path, reliability):
    n_atoms = arrays_of(good)['n_atoms'].copy()
    n_atoms[0] += 1  # one more atom claimed than the arrays hold: atoms would shift between samples
    bad = rewrite(good, tmp_path / 'bad.npz', replace={'n_atoms': n_atoms})
    error = reliability.raises(ENTRY, 'sum(n_atoms) differs from the atom arrays', DatasetError, Dataset.load, bad)
    assert 'bad.npz' in str(error) and 'numbers' in str(error) and '(10,)' in str(error)


def test_present_mask_that_does_not_match_the_values(good, tmp_path, reliability):
    key = 'edge_targets::hopping::present'
    present = arrays_of(good)[key].copy()
    present[1] = True  # claims a third sample with edges; counts/values hold two
    bad = rewrite(good, tmp_path / 'bad.npz', replace={key: present})
    error = reliability.raises(
        ENTRY, 'a present mask with more samples than the values', DatasetError, Dataset.load, bad
    )
    assert 'hopping::count' in str(error)
    key = 'node_targets::born_charges::present'
    present = arrays_of(good)[key].copy()
    present[2] = False
    bad = rewrite(good, tmp_path / 'bad2.npz', replace={key: present})
    error = reliability.raises(
        ENTRY, 'a present mask with fewer atoms than the values', DatasetError, Dataset.load, bad
    )
    assert 'born_charges::values' in str(error) and 'expected (7, 3, 3)' in str(error)


def test_wrong_dtypes_and_shapes(good, tmp_path, reliability):
    arrays = arrays_of(good)
    bad = rewrite(good, tmp_path / 'dtype.npz', replace={'positions': arrays['positions'].astype('U8')})
    error = reliability.raises(ENTRY, 'positions stored as strings', DatasetError, Dataset.load, bad)
    assert 'positions' in str(error) and 'dtype' in str(error)
    bad = rewrite(good, tmp_path / 'shape.npz', replace={'graph_targets::dielectric::values': np.zeros((3, 9))})
    error = reliability.raises(ENTRY, 'graph target of the wrong per-entry shape', DatasetError, Dataset.load, bad)
    assert 'dielectric::values' in str(error) and 'expected (3, 3, 3)' in str(error)


def test_only_expected_members_are_read(good, tmp_path, reliability):
    """A stray member (here: one declaring 8 TB, and one that is not .npy at all) is never opened."""
    huge = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    huge['shape'] = (2**40,)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, huge)
    bad = rewrite(good, tmp_path / 'stray.npz', raw={'unused': buffer.getvalue(), 'garbage': b'\x00' * 100})
    loaded = Dataset.load(bad)
    assert len(loaded) == 3
    assert dataset_sha256(bad) == dataset_sha256(good)  # the hash covers the dataset's members only
    reliability.record(
        ENTRY, 'unused member declaring 8 TB', f'ignored: loads {len(loaded)} samples, same content hash'
    )


def test_header_declaring_8_tb_is_refused_before_allocating(good, tmp_path, reliability):
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 3)))
    header['shape'] = (2**39, 3)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    bad = rewrite(good, tmp_path / 'huge.npz', raw={'positions': buffer.getvalue() + b'\x00' * 64})
    error = reliability.raises(ENTRY, 'positions header declaring 8 TB', DatasetError, Dataset.load, bad)
    assert 'positions' in str(error)
    # Consistent headers everywhere, but beyond the zip entry: the size bound from the entry applies.
    n = 2**31
    arrays = arrays_of(good)
    header = np.lib.format.header_data_from_array_1_0(arrays['numbers'])
    header['shape'] = (n,)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    bad = rewrite(
        good, tmp_path / 'huge2.npz', replace={'n_atoms': np.array([n - 6, 4, 2])}, raw={'numbers': buffer.getvalue()}
    )
    error = reliability.raises(
        ENTRY, 'n_atoms and numbers header both claiming 2^31 atoms', DatasetError, Dataset.load, bad
    )
    assert 'numbers' in str(error) and 'zip entry holds' in str(error)


def test_truncated_and_missing_members(good, tmp_path, reliability):
    data = good.read_bytes()
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(data[: len(data) // 2])
    error = reliability.raises(ENTRY, 'npz truncated to half', DatasetError, Dataset.load, truncated)
    assert 'truncated.npz' in str(error)
    bad = rewrite(good, tmp_path / 'missing.npz', drop=('cells',))
    error = reliability.raises(ENTRY, 'a member missing (cells)', DatasetError, Dataset.load, bad)
    assert 'cells' in str(error) and 'missing' in str(error)
    meta = json.loads(str(arrays_of(good)['metadata']))
    meta['layout'].pop('edge_attrs')
    bad = rewrite(good, tmp_path / 'layout.npz', replace={'metadata': np.array(json.dumps(meta))})
    error = reliability.raises(ENTRY, 'metadata layout lacking a group', DatasetError, Dataset.load, bad)
    assert 'metadata.layout' in str(error)
    meta = json.loads(str(arrays_of(good)['metadata']))
    meta['info'] = meta['info'][:2]
    bad = rewrite(good, tmp_path / 'info.npz', replace={'metadata': np.array(json.dumps(meta))})
    error = reliability.raises(ENTRY, 'metadata info for fewer samples than n_atoms', DatasetError, Dataset.load, bad)
    assert 'n_atoms' in str(error)


def test_sample_validation_names_the_file(good, tmp_path):
    positions = arrays_of(good)['positions'].copy()
    positions[0, 0] = np.inf
    bad = rewrite(good, tmp_path / 'inf.npz', replace={'positions': positions})
    with pytest.raises(DatasetError, match=r"inf\.npz: sample 0 \('s0'\): positions contain NaN/inf"):
        Dataset.load(bad)
    metadata, arrays = read_dataset_arrays(good)
    assert set(arrays) >= {'metadata', 'n_atoms', 'numbers', 'positions', 'cells', 'pbc'}


def test_train_cli_reports_a_truncated_dataset_as_invalid_input(good, tmp_path, reliability):
    from aiida_eqml.ml.train_cli import EXIT_CODES

    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(good.read_bytes()[:500])
    config = tmp_path / 'config.json'
    config.write_text(
        json.dumps({'model': {'heads': {'dielectric': {'level': 'graph', 'tensor': 'ij=ji'}}}, 'progress': False})
    )
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'aiida_eqml.ml.train_cli',
            '--dataset',
            truncated,
            '--config',
            config,
            '--out',
            tmp_path / 'out',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_CODES['invalid_input'], proc.stderr[-2000:]
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert (
        metrics['status'] == 'invalid_input'
        and 'DatasetError' in metrics['message']
        and 'truncated.npz' in metrics['message']
    )
    reliability.record(
        'python -m aiida_eqml.ml.train_cli --dataset',
        'truncated .npz',
        f"exit {proc.returncode} ({metrics['status']}): {metrics['message']}",
    )
