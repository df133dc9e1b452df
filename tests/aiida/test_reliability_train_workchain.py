"""``eqml.train`` work chain: a NaN-loss run is not retried when halving the learning rate cannot help."""
from __future__ import annotations

import pytest
from conftest_train import TINY_MODEL, ensure_entry_points, local_computer, tiny_config, tiny_dataset


@pytest.fixture(scope='module')
def python_code(aiida_profile, tmp_path_factory):
    from aiida_eqml.calculations.train import get_or_create_python_code

    ensure_entry_points()
    return get_or_create_python_code(local_computer(str(tmp_path_factory.mktemp('eqml-train-workdir'))))


def _builder(code, config):
    from aiida import orm

    from aiida_eqml.data.dataset import EqmlDatasetData
    from aiida_eqml.workflows.train import EqmlTrainWorkChain

    builder = EqmlTrainWorkChain.get_builder()
    builder.train.code = code
    builder.train.datasets = {'tio': EqmlDatasetData.get_or_create(tiny_dataset(4))}
    builder.train.config = orm.Dict(config)
    builder.train.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
    builder.train.metadata.options.max_wallclock_seconds = 600
    return builder


def test_nan_loss_at_the_smallest_learning_rate_stops(python_code, reliability):
    from aiida.engine import run_get_node

    # A zero normalisation scale makes the loss NaN whatever the step size: halving 1.5e-8 cannot help.
    model = {**TINY_MODEL, 'normalization': {'born_charges': {'scale': 0.0}}}
    config = tiny_config(model=model, normalization='auto', epochs=2, optimizer={'learning_rate': 1.5e-8})
    _, node = run_get_node(_builder(python_code, config))
    assert node.exit_status == 311, (node.exit_status, node.exit_message)
    assert len(node.called) == 1 and node.called[0].exit_status == 320  # one run, no retry at half of it
    reliability.record(
        'eqml.train (WorkChain)',
        'NaN loss at learning rate 1.5e-8',
        f'exit {node.exit_status} after one run: {node.exit_message}',
    )


def test_non_numeric_learning_rate_is_refused_before_submission(python_code, reliability):
    from aiida.engine import run_get_node

    _, node = run_get_node(_builder(python_code, tiny_config(optimizer={'learning_rate': 'nan'})))
    assert node.exit_status == 310 and 'optimizer.learning_rate' in node.exit_message, node.exit_message
    assert not node.called
    reliability.record(
        'eqml.train (WorkChain)',
        "learning rate 'nan' (a string: Dict nodes refuse NaN)",
        f'exit {node.exit_status}, nothing submitted: {node.exit_message}',
    )
