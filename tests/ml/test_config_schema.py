"""Training configs of the wrong type or range, all-NaN targets and resuming on other data are refused up front."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_training import MODEL, base_config, tiny_dataset

from aiida_eqml.ml.config_schema import ConfigError, validate_model_config
from aiida_eqml.ml.training import train, training_config

ENTRY = 'train(dataset, config) (ML API)'

BAD_CONFIGS = {
    'num_layers -2': ({'model': {**MODEL, 'num_layers': -2}}, 'model.num_layers'),
    'num_layers 1.5': ({'model': {**MODEL, 'num_layers': 1.5}}, 'model.num_layers'),
    'learning rate NaN': ({'optimizer': {'learning_rate': float('nan')}}, 'optimizer.learning_rate'),
    'learning rate -1e-3': ({'optimizer': {'learning_rate': -1e-3}}, 'optimizer.learning_rate'),
    'learning rate "fast"': ({'optimizer': {'learning_rate': 'fast'}}, 'optimizer.learning_rate'),
    'epochs true': ({'epochs': True}, 'epochs'),
    'batch_size 0': ({'batch_size': 0}, 'batch_size'),
    'negative cutoff': ({'model': {**MODEL, 'cutoff': -3.0}}, 'model.cutoff'),
    'species ["Xx"]': ({'model': {**MODEL, 'species': ['Xx']}}, 'model.species'),
    'clip_norm 0': ({'optimizer': {'clip_norm': 0}}, 'optimizer.clip_norm'),
    'patience -1': ({'early_stopping': {'patience': -1}}, 'early_stopping.patience'),
    'divergence_factor 0.5': ({'divergence_factor': 0.5}, 'divergence_factor'),
    'normalization "yes"': ({'normalization': 'yes'}, 'normalization'),
    'all target weights 0': ({'targets': {'born_charges': {'weight': 0}}}, 'targets'),
}


@pytest.mark.parametrize('name', sorted(BAD_CONFIGS))
def test_bad_training_config(name, reliability):
    overrides, key = BAD_CONFIGS[name]
    error = reliability.raises(ENTRY, f'config {name}', ConfigError, train, tiny_dataset(2), base_config(**overrides))
    assert str(error).startswith(key) and isinstance(error, ValueError)


def test_defaults_and_the_test_configs_validate():
    training_config(base_config())
    validate_model_config({**MODEL, 'species': ['O', 'Ti']})


def test_batch_size_beyond_the_training_split(reliability):
    config = base_config(batch_size=5, split={'train': [0, 1, 2], 'val': [], 'test': []})
    error = reliability.raises(
        ENTRY, 'batch_size 5 for 3 training samples', ConfigError, train, tiny_dataset(3), config
    )
    assert 'batch_size' in str(error) and '3 samples' in str(error)


def test_all_nan_targets_are_refused(reliability):
    dataset = tiny_dataset(3)
    for sample in dataset:
        sample.node_targets['born_charges'][:] = np.nan
    config = base_config(split={'train': [0, 1], 'val': [2], 'test': []})
    error = reliability.raises(ENTRY, 'a target NaN in every training sample', ConfigError, train, dataset, config)
    assert "'born_charges'" in str(error) and 'all NaN' in str(error)


def test_resume_with_another_dataset_is_refused(tmp_path, reliability):
    config = base_config(epochs=3, split={'train': [0, 1], 'val': [2], 'test': []})
    train(tiny_dataset(3), config, tmp_path, stop_after_epochs=1)
    other = tiny_dataset(3, seed=5)
    error = reliability.raises(
        ENTRY,
        'resume from a checkpoint of another dataset',
        ValueError,
        train,
        other,
        config,
        resume=tmp_path / 'checkpoint.msgpack',
    )
    assert 'another dataset' in str(error)


def test_train_cli_reports_bad_configs_as_invalid_input(tmp_path, reliability):
    from aiida_eqml.ml.train_cli import EXIT_CODES

    tiny_dataset(3).save(tmp_path / 'd.npz')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    # json.load accepts NaN: the CLI is where a NaN learning rate can arrive (AiiDA Dict nodes refuse NaN).
    for name, overrides in (
        ('learning rate NaN', {'optimizer': {'learning_rate': float('nan')}}),
        ('num_layers -2', {'model': {**MODEL, 'num_layers': -2}}),
    ):
        config = tmp_path / 'config.json'
        config.write_text(json.dumps(base_config(**overrides)))
        out = tmp_path / name.replace(' ', '_')
        proc = subprocess.run(
            [
                sys.executable,
                '-m',
                'aiida_eqml.ml.train_cli',
                '--dataset',
                tmp_path / 'd.npz',
                '--config',
                config,
                '--out',
                out,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        metrics = json.loads((out / 'metrics.json').read_text())
        assert proc.returncode == EXIT_CODES['invalid_input'], (proc.returncode, proc.stderr[-2000:])
        assert metrics['status'] == 'invalid_input' and 'ConfigError' in metrics['message']
        assert not (out / 'model.eqml').exists()
        reliability.record(
            'python -m aiida_eqml.ml.train_cli --config',
            name,
            f"exit {proc.returncode} ({metrics['status']}): {metrics['message']}",
        )
