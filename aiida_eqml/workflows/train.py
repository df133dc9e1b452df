"""``eqml.train`` (restart work chain around the ``eqml.train`` CalcJob) and ``eqml.train.ensemble`` (N seeds).

``EqmlTrainWorkChain`` checks the inputs once (exit code, nothing submitted, if they cannot train), runs the CalcJob
and handles its failures:

* walltime (120) or an interrupted run (300): resubmit with the last ``checkpoint`` as ``restart_checkpoint``, so the
  training continues where it stopped (exactly: see ``aiida_eqml.ml.training.train``);
* NaN loss (320) or divergence (321): restart from scratch with half the learning rate (the config changes, so the
  old checkpoint does not apply);
* input rejected by the training process (302): stop with ``ERROR_INVALID_INPUTS``.

``EqmlEnsembleTrainWorkChain`` runs one ``EqmlTrainWorkChain`` per seed (the config's ``seed`` drives both the
weight initialisation and the shuffling; a fractional split is fixed once with the config's seed and given to every
member as explicit indices, so that the members' spread measures the model uncertainty, not the choice of test set)
and returns the models in ``models.seed_<n>``.
"""
from __future__ import annotations

import copy
import math

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import BaseRestartWorkChain, ProcessHandlerReport, WorkChain, process_handler, while_

from aiida_eqml.calculations.train import EqmlTrainCalculation, TrainingInputError, check_training_inputs
from aiida_eqml.data.model import EqmlModelData

__all__ = ('EqmlTrainWorkChain', 'EqmlEnsembleTrainWorkChain')

#: Below this the NaN/divergence handler stops instead of halving again (a step this small is not the problem).
MIN_LEARNING_RATE = 1e-8


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class EqmlTrainWorkChain(BaseRestartWorkChain):
    """Train a model; resume from the checkpoint after a walltime, retry a NaN/diverged run at a lower rate."""

    _process_class = EqmlTrainCalculation

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(EqmlTrainCalculation, namespace='train')
        spec.outline(
            cls.setup,
            cls.validate_training_inputs,
            while_(cls.should_run_process)(cls.run_process, cls.inspect_process),
            cls.results,
        )
        spec.expose_outputs(EqmlTrainCalculation)
        spec.exit_code(310, 'ERROR_INVALID_INPUTS', message='The inputs cannot train a model: {message}')
        spec.exit_code(
            311,
            'ERROR_UNSTABLE_TRAINING',
            message='Training stays unstable and halving the learning rate cannot help: {message}',
        )

    def setup(self):
        super().setup()
        self.ctx.inputs = AttributeDict(self.exposed_inputs(EqmlTrainCalculation, 'train'))

    def validate_training_inputs(self):
        """The CalcJob's own pre-submission checks, once, before anything is submitted."""
        try:
            check_training_inputs(
                dict(self.ctx.inputs.datasets), self.ctx.inputs.config.get_dict(), self.ctx.inputs.get('parent_model')
            )
        except TrainingInputError as exception:
            self.report(str(exception))
            return self.exit_codes.ERROR_INVALID_INPUTS.format(message=str(exception))

    @process_handler(
        priority=600,
        exit_codes=[
            EqmlTrainCalculation.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME,
            EqmlTrainCalculation.exit_codes.ERROR_INTERRUPTED,
        ],
    )
    def handle_out_of_walltime(self, node):
        """Resume from the last checkpoint (from scratch when the run stopped before its first epoch)."""
        if 'checkpoint' in node.outputs:
            self.ctx.inputs.restart_checkpoint = node.outputs.checkpoint
            self.report(f'{node.process_label}<{node.pk}> stopped ({node.exit_status}); resuming from its checkpoint')
        else:
            self.report(
                f'{node.process_label}<{node.pk}> stopped ({node.exit_status}) before its first checkpoint; rerunning'
            )
        return ProcessHandlerReport(do_break=True)

    @process_handler(
        priority=500,
        exit_codes=[EqmlTrainCalculation.exit_codes.ERROR_NAN_LOSS, EqmlTrainCalculation.exit_codes.ERROR_DIVERGED],
    )
    def handle_unstable_training(self, node):
        """Halve the learning rate and start again (a checkpoint of another config does not apply).

        Stops with ``ERROR_UNSTABLE_TRAINING`` when halving cannot help: a learning rate that is not a finite positive
        number (NaN / 2 is NaN), or one already below ``MIN_LEARNING_RATE`` (then the instability is in the data or
        the model, not in the step size).
        """
        config = copy.deepcopy(self.ctx.inputs.config.get_dict())
        optimizer = config.setdefault('optimizer', {})
        from aiida_eqml.ml.training import DEFAULT_TRAINING_CONFIG

        old = _as_float(optimizer.get('learning_rate', DEFAULT_TRAINING_CONFIG['optimizer']['learning_rate']))
        if not (math.isfinite(old) and old / 2 >= MIN_LEARNING_RATE):
            message = (
                f'{node.process_label}<{node.pk}>: {node.exit_message}; learning rate {old!r} cannot be halved '
                f'usefully (not finite, or half of it below {MIN_LEARNING_RATE:g})'
            )
            self.report(message)
            return ProcessHandlerReport(
                do_break=True, exit_code=self.exit_codes.ERROR_UNSTABLE_TRAINING.format(message=message)
            )
        optimizer['learning_rate'] = old / 2
        self.ctx.inputs.config = orm.Dict(config)
        self.ctx.inputs.pop('restart_checkpoint', None)
        self.report(
            f'{node.process_label}<{node.pk}>: {node.exit_message}; restarting with learning rate {old / 2:.3g}'
        )
        return ProcessHandlerReport(do_break=True)

    @process_handler(priority=400, exit_codes=[EqmlTrainCalculation.exit_codes.ERROR_INVALID_INPUT])
    def handle_invalid_input(self, node):
        """Nothing to retry: the training process rejected the inputs."""
        return ProcessHandlerReport(
            do_break=True, exit_code=self.exit_codes.ERROR_INVALID_INPUTS.format(message=node.exit_message)
        )


def shared_split_config(config: dict, datasets) -> dict:
    """``config`` with a fraction split replaced by the explicit indices it gives with the config's own seed.

    The split of ``aiida_eqml.ml.training.train`` is drawn with the training seed; fixing it here gives every member
    the same train/validation/test sets (samples ordered as the CalcJob concatenates them: sorted dataset keys).
    """
    from aiida_eqml.ml.training import DEFAULT_TRAINING_CONFIG, split_indices

    split = config.get('split', DEFAULT_TRAINING_CONFIG['split'])
    if 'train' in split:
        return dict(config)
    n_samples = sum(datasets[key].n_samples for key in sorted(datasets))
    return {
        **config,
        'split': split_indices(n_samples, split, int(config.get('seed', DEFAULT_TRAINING_CONFIG['seed']))),
    }


def validate_ensemble(inputs, _):
    seeds = inputs.get('seeds')
    if seeds is not None:
        values = seeds.get_list()
        if not values or len(set(values)) != len(values) or not all(isinstance(v, int) for v in values):
            return f'`seeds` must be a non-empty list of distinct integers, got {values}'
    size = inputs.get('ensemble_size')
    if size is not None and size.value < 1:
        return f'`ensemble_size` must be at least 1, got {size.value}'
    if seeds is not None and size is not None and size.value != len(seeds.get_list()):
        return f'`ensemble_size` {size.value} and `seeds` {seeds.get_list()} disagree; give one of them'


class EqmlEnsembleTrainWorkChain(WorkChain):
    """Train N models that differ only in their seed (a deep ensemble: the spread of predictions is the uncertainty)."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(EqmlTrainWorkChain, exclude=('metadata',))
        spec.input('ensemble_size', valid_type=orm.Int, required=False, help='N members, seeds config seed + 0..N-1.')
        spec.input('seeds', valid_type=orm.List, required=False, help='Explicit seeds, one member each.')
        spec.inputs.validator = validate_ensemble
        spec.outline(cls.run_members, cls.results)
        spec.output_namespace('models', valid_type=EqmlModelData, dynamic=True, help='`seed_<n>`: one model per seed.')
        spec.output_namespace('metrics', valid_type=orm.Dict, dynamic=True, help='`seed_<n>`: its metrics.')
        spec.exit_code(401, 'ERROR_MEMBERS_FAILED', message='Ensemble members failed: {message}')

    def seeds(self) -> list[int]:
        if 'seeds' in self.inputs:
            return list(self.inputs.seeds.get_list())
        base = int(self.inputs.train.config.get_dict().get('seed', 0))
        size = self.inputs.ensemble_size.value if 'ensemble_size' in self.inputs else 1
        return [base + k for k in range(size)]

    def run_members(self):
        inputs = AttributeDict(self.exposed_inputs(EqmlTrainWorkChain))
        config = shared_split_config(inputs.train.config.get_dict(), inputs.train.datasets)
        for seed in self.seeds():
            member = {**inputs, 'train': {**inputs.train, 'config': orm.Dict({**config, 'seed': seed})}}
            member['metadata'] = {'call_link_label': f'seed_{seed}'}
            node = self.submit(EqmlTrainWorkChain, **member)
            self.report(f'ensemble member seed {seed}: {node.process_label}<{node.pk}>')
            self.to_context(**{f'seed_{seed}': node})

    def results(self):
        failed = []
        for seed in self.seeds():
            node = self.ctx[f'seed_{seed}']
            if not node.is_finished_ok:
                failed.append(
                    f'seed {seed}: {node.process_label}<{node.pk}> exit {node.exit_status} {node.exit_message}'
                )
                continue
            self.out(f'models.seed_{seed}', node.outputs.model)
            self.out(f'metrics.seed_{seed}', node.outputs.metrics)
        if failed:
            return self.exit_codes.ERROR_MEMBERS_FAILED.format(message='; '.join(failed))
