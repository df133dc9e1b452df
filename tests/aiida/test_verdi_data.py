"""``verdi data eqml dataset|model list|show|export``."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest_train import ensure_entry_points, random_model_file, tiny_dataset


@pytest.fixture(scope='module')
def nodes(aiida_profile, tmp_path_factory):
    from aiida_eqml.data.dataset import EqmlDatasetData
    from aiida_eqml.data.model import EqmlModelData

    ensure_entry_points()
    dataset = EqmlDatasetData.get_or_create(tiny_dataset(3, seed=21))
    path, _ = random_model_file(
        tmp_path_factory.mktemp('cli') / 'model.eqml',
        0,
        metadata={
            'metrics': {'test': {'born_charges': {'mae': 0.0123, 'rmse': 0.02}}},
            'best_epoch': 4,
            'epochs_run': 9,
        },
    )
    model = EqmlModelData.get_or_create(path)
    return dataset, model, path


def invoke(*args):
    from click.testing import CliRunner

    from aiida_eqml.cli.verdi_data import data_eqml

    result = CliRunner().invoke(data_eqml, [str(a) for a in args], catch_exceptions=False)
    return result


def test_registered_under_verdi_data():
    from aiida.cmdline.commands.cmd_data import verdi_data

    import aiida_eqml.cli.verdi_data  # noqa: F401 - registers the group

    assert 'eqml' in verdi_data.commands
    assert set(verdi_data.commands['eqml'].commands) == {'dataset', 'model'}


def test_dataset_list_show_export(nodes, tmp_path):
    from aiida_eqml.ml.dataset import Dataset

    dataset, _, _ = nodes
    result = invoke('dataset', 'list', '--species', 'Ti', '--target', 'born_charges')
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.split() and line.split()[0] == str(dataset.pk))
    assert ' 3 ' in row and 'O,Ti' in row and 'born_charges,dielectric' in row and dataset.sha256[:12] in row
    assert str(dataset.pk) not in invoke('dataset', 'list', '--species', 'Ba').output.split()

    result = invoke('dataset', 'show', dataset.pk)
    assert result.exit_code == 0, result.output
    assert 'born_charges' in result.output and 'ij=ji' in result.output and dataset.sha256 in result.output

    npz = tmp_path / 'd.npz'
    assert invoke('dataset', 'export', dataset.pk, npz).exit_code == 0
    back = Dataset.load(npz)
    np.testing.assert_array_equal(
        back[0].node_targets['born_charges'], dataset.get_dataset()[0].node_targets['born_charges']
    )
    assert invoke('dataset', 'export', dataset.pk, npz).exit_code != 0  # exists, no --force
    xyz = tmp_path / 'd.extxyz'
    assert invoke('dataset', 'export', dataset.pk, xyz).exit_code == 0
    import ase.io

    assert len(ase.io.read(xyz, index=':')) == 3


def test_model_list_show_export(nodes, tmp_path):
    _, model, path = nodes
    result = invoke('model', 'list', '--target', 'dielectric')
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.split() and line.split()[0] == str(model.pk))
    assert 'nequip' in row and 'O,Ti' in row and 'born_charges=0.0123' in row

    result = invoke('model', 'show', model.pk, '--metrics')
    assert result.exit_code == 0, result.output
    assert (
        model.sha256 in result.output and '4 / 9' in result.output and '1x0e+1x2e' not in result.output.split('Head')[0]
    )
    assert '0.0123' in result.output

    out = tmp_path / 'exported.eqml'
    result = invoke('model', 'export', model.pk, out)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_node_type_is_a_clear_error(nodes):
    dataset, model, _ = nodes
    result = CliRunner_invoke_expect_failure('model', 'show', dataset.pk)
    assert 'is a EqmlDatasetData, not an eqml.model' in result.output
    result = CliRunner_invoke_expect_failure('dataset', 'show', model.pk)
    assert 'not an eqml.dataset' in result.output
    result = CliRunner_invoke_expect_failure('model', 'show', 999999)
    assert 'no node with identifier' in result.output


def CliRunner_invoke_expect_failure(*args):  # noqa: N802 - reads as what it does in the test
    result = invoke(*args)
    assert result.exit_code != 0
    return result
