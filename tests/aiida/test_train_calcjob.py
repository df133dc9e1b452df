"""``eqml.train`` CalcJob + parser: real training jobs (python -m aiida_eqml.ml.train_cli) on localhost."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest_train import ensure_entry_points, local_computer, tiny_config, tiny_dataset


@pytest.fixture(scope='module')
def python_code(aiida_profile, tmp_path_factory):
    from aiida_eqml.calculations.train import get_or_create_python_code

    ensure_entry_points()
    computer = local_computer(str(tmp_path_factory.mktemp('eqml-train-workdir')))
    return get_or_create_python_code(computer)


@pytest.fixture(scope='module')
def dataset_node(python_code):
    from aiida_eqml.data.dataset import EqmlDatasetData

    return EqmlDatasetData.get_or_create(tiny_dataset(4))


def builder_for(code, datasets, config, target=None, **kwargs):
    """Fill the inputs of an ``eqml.train`` CalcJob on ``target`` (a builder namespace; default: a new CalcJob
    builder)."""
    from aiida import orm

    from aiida_eqml.calculations.train import EqmlTrainCalculation

    builder = EqmlTrainCalculation.get_builder() if target is None else target
    builder.code = code
    builder.datasets = datasets
    builder.config = orm.Dict(config)
    builder.metadata.options.resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
    builder.metadata.options.max_wallclock_seconds = kwargs.pop('max_wallclock_seconds', 600)
    builder.metadata.options.walltime_margin_seconds = kwargs.pop('walltime_margin_seconds', 30)
    for key, value in kwargs.items():
        setattr(builder, key, value)
    return builder


@pytest.fixture(scope='module')
def trained(python_code, dataset_node):
    """One real training job: (results, node)."""
    from aiida.engine import run_get_node

    return run_get_node(builder_for(python_code, {'tio': dataset_node}, tiny_config(epochs=3)))


def test_training_job_outputs(trained, dataset_node):
    from aiida import orm

    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.modelfile import file_sha256
    from aiida_eqml.ml.training import load_checkpoint

    results, node = trained
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    model = results['model']
    assert isinstance(model, EqmlModelData)
    assert model.species == ['O', 'Ti']
    assert model.targets == ['born_charges', 'dielectric']
    assert model.architecture == 'nequip'
    assert model.cutoff == 3.0
    assert model.heads['born_charges']['irreps'] == '1x0e+1x1e+1x2e'
    # The test split has one structure: the metrics name it per target and per species.
    assert set(model.test_metrics) == {'born_charges', 'dielectric'}
    assert set(model.test_metrics['born_charges']['per_species']) == {'O', 'Ti'}

    metrics = results['metrics'].get_dict()
    assert metrics['status'] == 'completed' and metrics['epochs_run'] == 3
    assert metrics['model_sha256'] == model.sha256
    assert len(metrics['split']['test']) == 1 and len(metrics['split']['val']) == 1
    # The training process saw exactly the dataset node's file.
    config, _, metadata = model.read()
    with dataset_node.base.repository.as_path(dataset_node.filename) as path:
        assert metadata['dataset_sha256'] == file_sha256(path)

    curve = results['learning_curve']
    np.testing.assert_array_equal(curve.get_array('epoch'), [1, 2, 3])
    assert np.all(np.isfinite(curve.get_array('train_loss')))
    assert 'val_born_charges' in curve.get_arraynames()

    checkpoint = results['checkpoint']
    assert isinstance(checkpoint, orm.SinglefileData)
    with checkpoint.as_path() as path:
        assert load_checkpoint(path)['epoch'] == 3

    # The job really ran the package's entry point with the files of the inputs.
    submit_script = node.base.repository.get_object_content('_aiidasubmit.sh')
    assert "'-m' 'aiida_eqml.ml.train_cli' '--dataset' 'dataset.npz' '--config' 'config.json'" in submit_script
    assert json.loads(node.base.repository.get_object_content('config.json'))['epochs'] == 3
    assert 'walltime watchdog' in submit_script


def test_checks_before_submission(python_code, dataset_node, trained):
    """Bad inputs end with a named exit code, nothing uploaded and no output node."""
    from aiida.engine import run_get_node

    from aiida_eqml.data.dataset import EqmlDatasetData

    def refused(builder, exit_code, *fragments):
        results, node = run_get_node(builder)
        assert node.exit_status == exit_code, (node.exit_status, node.exit_message)
        for fragment in fragments:
            assert fragment in node.exit_message, node.exit_message
        assert results == {} and not node.base.links.get_outgoing().all()
        assert node.get_remote_workdir() is None  # never uploaded

    # A dataset whose only target the model has no head for.
    only_dielectric = EqmlDatasetData.get_or_create(tiny_dataset(3, targets=('dielectric',)))
    born_only = {**tiny_config()['model'], 'heads': {'born_charges': {'level': 'node', 'tensor': 'ij'}}}
    refused(
        builder_for(python_code, {'d': only_dielectric}, tiny_config(model=born_only)),
        311,
        "['dielectric']",
        "['born_charges']",
    )
    # Elements of the dataset unknown to the parent model.
    from aiida_eqml.ml.dataset import Dataset, Sample

    tiny = tiny_dataset(2)
    bao = [
        Sample(
            np.array([56, 8]),
            s.positions[:2],
            s.cell,
            True,
            node_targets={'born_charges': s.node_targets['born_charges'][:2]},
        )
        for s in tiny
    ]
    bao_node = EqmlDatasetData(Dataset(bao, {'born_charges': tiny.target_specs['born_charges']})).store()
    results, _ = trained
    refused(
        builder_for(python_code, {'bao': bao_node}, tiny_config(), parent_model=results['model']),
        312,
        "['Ba']",
        "species ['O', 'Ti']",
    )
    # A typo in the config.
    refused(
        builder_for(python_code, {'tio': dataset_node}, tiny_config(epoch=3)),
        310,
        "unknown training config keys ['epoch']",
    )


def test_input_rejected_by_the_training_process(python_code, dataset_node):
    """What only the training process can see (here: a split that leaves nothing to train) -> 302, no model."""
    from aiida.engine import run_get_node

    config = tiny_config(split={'val_fraction': 0.45, 'test_fraction': 0.45})  # 4 samples: 2 val, 2 test, 0 train
    results, node = run_get_node(builder_for(python_code, {'tio': dataset_node}, config))
    assert node.exit_status == 302, (node.exit_status, node.exit_message)
    assert 'split leaves no training samples' in node.exit_message
    assert 'model' not in results and 'checkpoint' not in results


def test_walltime_then_resume_from_checkpoint(python_code, dataset_node, trained):
    """A run cut by the walltime watchdog exits 120 with its checkpoint; the restart work chain resumes from it.

    The budget is scaled from the wall time of the `trained` job on this (shared, variably loaded) machine so that
    each run gets through its start-up and some epochs but never through the 100000 epochs asked for; with
    ``max_iterations = 2`` the work chain must then stop with 401, after resuming once from the first checkpoint.
    """
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_eqml.ml.training import load_checkpoint
    from aiida_eqml.workflows.train import EqmlTrainWorkChain

    _, reference = trained
    budget = int(max(30, 1.5 * reference.outputs.metrics['wall_time_s'] + 8))
    builder = EqmlTrainWorkChain.get_builder()
    builder_for(
        python_code, {'tio': dataset_node}, tiny_config(epochs=100000, early_stopping={'patience': 0}),
        target=builder.train, max_wallclock_seconds=budget + 5, walltime_margin_seconds=5,
    )
    builder.max_iterations = orm.Int(2)
    results, node = run_get_node(builder)
    assert node.exit_status == 401, (node.exit_status, node.exit_message)  # ERROR_MAXIMUM_ITERATIONS_EXCEEDED
    first, second = sorted(node.called, key=lambda n: n.ctime)
    for calc in (first, second):
        assert calc.exit_status == 120, (calc.exit_status, calc.exit_message)
        assert 'walltime_reached' in calc.outputs.retrieved.base.repository.list_object_names()
        assert 'model' not in calc.outputs and 'checkpoint' in calc.outputs
    assert 'restart_checkpoint' not in first.inputs
    assert second.inputs.restart_checkpoint.uuid == first.outputs.checkpoint.uuid
    epochs = []
    for calc in (first, second):
        with calc.outputs.checkpoint.as_path() as path:
            epochs.append(load_checkpoint(path)['epoch'])
    assert 0 < epochs[0] < epochs[1]  # the second run continued where the first stopped
    curve = second.outputs.learning_curve.get_array('epoch')
    np.testing.assert_array_equal(curve, np.arange(1, epochs[1] + 1))  # one history, no restart from epoch 1


def test_submitted_to_the_daemon_and_parsed(tmp_path):
    """`submit` to a real daemon (own profile with a ZeroMQ broker, see conftest_train.daemon_scenario)."""
    from conftest_train import run_daemon_scenario

    result = run_daemon_scenario(tmp_path, interrupt=False, epochs=3)
    assert result['finished_ok'], result
    assert {'model', 'metrics', 'learning_curve', 'checkpoint', 'retrieved', 'remote_folder'} <= set(result['outputs'])
    assert result['model']['targets'] == ['born_charges', 'dielectric'] and result['epochs_run'] == 3


def test_ensemble_trains_one_model_per_seed(python_code, dataset_node):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_eqml.workflows.train import EqmlEnsembleTrainWorkChain

    builder = EqmlEnsembleTrainWorkChain.get_builder()
    builder_for(python_code, {'tio': dataset_node}, tiny_config(epochs=1, seed=7), target=builder.train)
    builder.ensemble_size = orm.Int(2)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert sorted(results['models']) == ['seed_7', 'seed_8']
    members = [results['models'][key] for key in ('seed_7', 'seed_8')]
    assert members[0].content_sha256 != members[1].content_sha256  # different initial weights
    for key, model in zip(('seed_7', 'seed_8'), members):
        config, _, metadata = model.read()
        assert metadata['training_config']['seed'] == int(key.split('_')[1])
    # Same split for every member: the spread measures the model, not the test set.
    splits = [results['metrics'][key]['split'] for key in ('seed_7', 'seed_8')]
    assert splits[0] == splits[1]
