"""``eqml.train``: train a model with the package's own entry point on any AiiDA computer.

The job runs exactly ``python -m aiida_eqml.ml.train_cli`` (see :mod:`aiida_eqml.ml.train_cli`), so the ``code``
is an ``InstalledCode`` of the **Python interpreter** of an environment where aiida-eqml is installed (on localhost:
``sys.executable``; on a cluster: the virtualenv's ``bin/python``; :func:`get_or_create_python_code` registers one).
We use the interpreter rather than a console script because it needs nothing installed beyond the package itself,
the module path is versioned with the package, and the same Code can run any future entry point of the package.

Inputs: ``datasets`` (one or more ``eqml.dataset`` nodes; several are concatenated into one file), ``config`` (the
training config of :data:`aiida_eqml.ml.training.DEFAULT_TRAINING_CONFIG`), optionally ``parent_model`` (fine-tune:
species, architecture and normalisation kept) and ``restart_checkpoint`` (resume an interrupted run with the same
datasets and config). Outputs: ``model`` (``eqml.model``), ``metrics`` (Dict), ``learning_curve`` (ArrayData, one
array per log column), ``checkpoint`` (SinglefileData, the last epoch's state, input of a resumed run).

GPUs: JAX picks the accelerator itself; ``metadata.options.gpus = N`` asks the scheduler for N of them (on
``core.slurm``: ``#SBATCH --gres=gpu:N``, unless ``custom_scheduler_commands`` already asks for GPUs; other schedulers:
use ``custom_scheduler_commands``) and the job records the ``CUDA_VISIBLE_DEVICES`` it was given in
``eqml_devices.txt`` (retrieved), see ``docs/training_on_hpc.md``.

Walltime: with ``metadata.options.max_wallclock_seconds`` set, a watchdog in the job script stops the training
``walltime_margin_seconds`` before the limit (so the last epoch's checkpoint is retrieved even on schedulers that do
not enforce walltimes, like ``core.direct``); a scheduler-detected timeout (Slurm ``TIMEOUT``) gives the same exit
code, ``ERROR_SCHEDULER_OUT_OF_WALLTIME`` (120), with the checkpoint as output: ``eqml.train`` (the restart work chain)
resumes from it.

Bad inputs that can be seen before submission (no learnable target, elements missing from the parent model, a parent
model file that fails its integrity check, datasets with conflicting target specs, an invalid config) end the
process with a named exit code before anything is uploaded, so no job is wasted and no output node is created.
"""
from __future__ import annotations

import json
import os
import tempfile

from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from aiida_eqml.data.dataset import EqmlDatasetData
from aiida_eqml.data.model import EqmlModelData
from aiida_eqml.ml import rundir

__all__ = ('EqmlTrainCalculation', 'get_or_create_python_code', 'check_training_inputs', 'TrainingInputError')

# The run-directory contract (aiida_eqml.ml.rundir): the names the training process and this CalcJob share.
DATASET_FILENAME = rundir.DATASET
CONFIG_FILENAME = rundir.CONFIG
PARENT_MODEL_FILENAME = rundir.PARENT_MODEL
RESUME_FILENAME = rundir.RESUME
#: Written by the walltime watchdog just before it stops the training.
WALLTIME_MARKER = rundir.WALLTIME_MARKER
#: The exit status of the training process, written by the job script (the scheduler does not keep it).
EXIT_STATUS_FILENAME = rundir.EXIT_STATUS_FILE
#: With ``metadata.options.gpus``: the devices the scheduler gave the job (``CUDA_VISIBLE_DEVICES=...``).
DEVICES_FILENAME = 'eqml_devices.txt'
OUTPUT_FILENAMES = rundir.OUTPUT_FILES
TRAIN_MODULE = rundir.TRAIN_MODULE


class TrainingInputError(ValueError):
    """Inputs that cannot train a model; ``exit_code`` names the CalcJob exit code."""

    def __init__(self, exit_code: str, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def get_or_create_python_code(computer: orm.Computer, executable: str | None = None, label: str = 'eqml-python'):
    """The ``InstalledCode`` ``label@computer`` running ``executable`` (default: this interpreter), created if
    absent."""
    import sys

    executable = executable or sys.executable
    query = orm.QueryBuilder().append(orm.Computer, filters={'uuid': computer.uuid}, tag='computer')
    query.append(orm.InstalledCode, with_computer='computer', filters={'label': label})
    for code in query.all(flat=True):
        if str(code.filepath_executable) == executable:
            return code
        raise ValueError(
            f'code `{label}@{computer.label}` exists but runs {code.filepath_executable}, not {executable}'
        )
    code = orm.InstalledCode(
        label=label,
        computer=computer,
        filepath_executable=executable,
        default_calc_job_plugin='eqml.train',
        description='Python interpreter with aiida-eqml installed (runs python -m aiida_eqml.ml.train_cli)',
    )
    return code.store()


# ====================================================================== checks before submission
def _model_heads(config: dict, parent: EqmlModelData | None) -> dict:
    heads = dict((config.get('model') or {}).get('heads') or {})
    if parent is not None:
        heads = {**{name: {} for name in parent.targets}, **heads}
    return heads


def check_training_inputs(datasets: dict, config: dict, parent: EqmlModelData | None = None) -> None:
    """Raise :class:`TrainingInputError` for inputs that cannot train (cheap: attributes, one file read)."""
    from aiida_eqml.ml.hubbard.records import HUBBARD_TARGET_SPECS
    from aiida_eqml.ml.modelfile import ModelFileError
    from aiida_eqml.ml.training import training_config

    try:
        full = training_config(config)
    except ValueError as exception:
        raise TrainingInputError('ERROR_INVALID_CONFIG', f'invalid training config: {exception}') from exception
    specs: dict[str, tuple[str, dict]] = {}
    for key, node in datasets.items():
        for name, spec in (node.target_specs or {}).items():
            if name in specs and specs[name][1] != spec:
                raise TrainingInputError(
                    'ERROR_INCOMPATIBLE_DATASETS',
                    f'datasets `{specs[name][0]}` and `{key}` both have target `{name}` but with different specs: '
                    f'{specs[name][1]} vs {spec}',
                )
            specs.setdefault(name, (key, spec))

    # Hubbard records get their U / V heads from the labels (aiida_eqml.ml.hubbard.training) when none are given.
    hubbard_heads = {name: {} for name in HUBBARD_TARGET_SPECS if name in specs}
    if parent is None and not (full.get('model') or {}).get('heads') and not hubbard_heads:
        raise TrainingInputError('ERROR_INVALID_CONFIG', 'the training config has no `model.heads` and no parent model')
    heads = _model_heads(full, parent) or hubbard_heads
    learnable = sorted(set(heads) & set(specs))
    if not learnable:
        names = {key: node.target_names for key, node in datasets.items()}
        raise TrainingInputError(
            'ERROR_NO_TARGETS',
            f'nothing to learn: the dataset target(s) {names} match none of the model heads {sorted(heads)}',
        )
    wanted = full.get('targets')
    if wanted:
        missing = sorted(set(wanted) - set(learnable))
        if missing:
            raise TrainingInputError(
                'ERROR_NO_TARGETS',
                f'config `targets` {missing} are not both model heads and dataset targets {learnable}',
            )

    species = sorted({symbol for node in datasets.values() for symbol in node.species})
    model_species = None
    if parent is not None:
        model_species = parent.species
        try:
            parent.read()  # the weight checksum: a corrupt repository file is caught here, not on the GPU node
        except (ModelFileError, OSError) as exception:
            raise TrainingInputError(
                'ERROR_CORRUPT_PARENT_MODEL', f'parent model pk={parent.pk}: {exception}'
            ) from exception
    elif (full.get('model') or {}).get('species'):
        model_species = list(full['model']['species'])
    if model_species is not None:
        unknown = sorted(set(species) - set(model_species))
        if unknown:
            whose = f'parent model pk={parent.pk}' if parent is not None else 'model config'
            raise TrainingInputError(
                'ERROR_SPECIES_MISMATCH',
                f'the dataset(s) contain element(s) {unknown} that the {whose} does not know (species {model_species})',
            )


def _merged_dataset_file(datasets: dict, path: str) -> None:
    """Concatenate several datasets (sorted by namespace key) into one ``.npz``; target specs are united."""
    from aiida_eqml.ml.dataset import Dataset

    samples, specs = [], {}
    for key in sorted(datasets):
        dataset = datasets[key].get_dataset()
        for sample in dataset.samples:
            sample.info = {**sample.info, 'dataset': key}
        samples.extend(dataset.samples)
        specs.update(dataset.target_specs)
    Dataset(samples, specs).save(path)


class EqmlTrainCalculation(CalcJob):
    """Train an equivariant model (``python -m aiida_eqml.ml.train_cli``) on one or more ``eqml.dataset`` nodes."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace(
            'datasets',
            valid_type=EqmlDatasetData,
            dynamic=True,
            help='Training data: one or more `eqml.dataset` nodes (several are concatenated, sorted by key).',
        )
        spec.input(
            'config', valid_type=orm.Dict, help='Training config (aiida_eqml.ml.training.DEFAULT_TRAINING_CONFIG).'
        )
        spec.input(
            'parent_model',
            valid_type=EqmlModelData,
            required=False,
            help='Model to fine-tune (species/architecture kept).',
        )
        spec.input(
            'restart_checkpoint',
            valid_type=orm.SinglefileData,
            required=False,
            help='`checkpoint` output of an interrupted run with the same datasets and config: training resumes there.',
        )
        spec.input(
            'metadata.options.walltime_margin_seconds',
            valid_type=int,
            default=60,
            help='With `max_wallclock_seconds`, stop the training this many seconds before the limit '
            '(checkpoint kept).',
        )
        spec.input(
            'metadata.options.gpus',
            valid_type=int,
            required=False,
            help='GPUs per job: on core.slurm `#SBATCH --gres=gpu:N` is added to the job script; the visible devices '
            'are recorded in eqml_devices.txt.',
        )
        spec.inputs['metadata']['options']['parser_name'].default = 'eqml.train'
        spec.inputs['metadata']['options']['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        spec.inputs['metadata']['options']['withmpi'].default = False
        spec.inputs['metadata']['options']['input_filename'].default = CONFIG_FILENAME
        spec.inputs['metadata']['options']['output_filename'].default = 'train.out'
        spec.inputs.validator = validate_inputs

        spec.output(
            'model', valid_type=EqmlModelData, required=False, help='The trained model (best validation epoch).'
        )
        spec.output(
            'metrics', valid_type=orm.Dict, required=False, help='metrics.json: status, errors per split/target.'
        )
        spec.output('learning_curve', valid_type=orm.ArrayData, required=False, help='One array per column of log.csv.')
        spec.output('checkpoint', valid_type=orm.SinglefileData, required=False, help='Last epoch state, for resuming.')

        # Checked before submission (see `run`): nothing uploaded, no outputs.
        spec.exit_code(310, 'ERROR_INVALID_CONFIG', message='Invalid training input: {message}')
        spec.exit_code(311, 'ERROR_NO_TARGETS', message='Dataset without learnable targets: {message}')
        spec.exit_code(312, 'ERROR_SPECIES_MISMATCH', message='Species mismatch: {message}')
        spec.exit_code(313, 'ERROR_CORRUPT_PARENT_MODEL', message='Corrupt parent model: {message}')
        spec.exit_code(314, 'ERROR_INCOMPATIBLE_DATASETS', message='Incompatible datasets: {message}')
        # Reported by the training process (train_cli exit codes) and the parser.
        spec.exit_code(300, 'ERROR_INTERRUPTED', message='The training ended without writing metrics.json: {message}')
        spec.exit_code(301, 'ERROR_TRAINING_FAILED', message='The training failed unexpectedly: {message}')
        spec.exit_code(302, 'ERROR_INVALID_INPUT', message='The training process rejected its input: {message}')
        spec.exit_code(320, 'ERROR_NAN_LOSS', message='The loss became NaN: {message}')
        spec.exit_code(321, 'ERROR_DIVERGED', message='The training diverged: {message}')
        spec.exit_code(330, 'ERROR_CORRUPT_MODEL_OUTPUT', message='The written model file is unreadable: {message}')

    def _setup_metadata(self, metadata: dict) -> None:
        """Turn ``options.gpus`` into the scheduler directive before the options are stored on the node."""
        options = dict(metadata.get('options') or {})
        gpus = options.get('gpus')
        computer = metadata.get('computer') or self.inputs.code.computer
        if gpus:
            directive = gpu_scheduler_directive(int(gpus), computer.scheduler_type if computer else None)
            custom = options.get('custom_scheduler_commands') or ''
            if directive and not any(flag in custom for flag in ('--gres=gpu', '--gpus', '--gres gpu')):
                options['custom_scheduler_commands'] = '\n'.join(filter(None, [directive, custom]))
            metadata = {**metadata, 'options': options}
        super()._setup_metadata(metadata)

    async def run(self):
        """Refuse bad inputs with an exit code before uploading anything (then the normal CalcJob run)."""
        if not self.inputs.metadata.dry_run and 'remote_folder' not in self.inputs and self.node.exit_status is None:
            try:
                check_training_inputs(
                    dict(self.inputs.datasets), self.inputs.config.get_dict(), self.inputs.get('parent_model')
                )
            except TrainingInputError as exception:
                self.report(str(exception))
                return self.exit_codes[exception.exit_code].format(message=str(exception))
        return await super().run()

    def prepare_for_submission(self, folder):
        datasets = dict(self.inputs.datasets)
        local_copy_list = []
        if len(datasets) == 1:
            (node,) = datasets.values()
            local_copy_list.append((node.uuid, node.filename, DATASET_FILENAME))
        else:
            with tempfile.TemporaryDirectory(prefix='eqml-train-') as scratch:
                merged = os.path.join(scratch, DATASET_FILENAME)
                _merged_dataset_file(datasets, merged)
                folder.insert_path(merged, DATASET_FILENAME)
        with folder.open(CONFIG_FILENAME, 'w') as handle:
            json.dump(self.inputs.config.get_dict(), handle, indent=1, sort_keys=True)

        cmdline = ['-m', TRAIN_MODULE, '--dataset', DATASET_FILENAME, '--config', CONFIG_FILENAME, '--out', '.']
        cmdline.append('--no-progress')  # a progress bar in a batch log is noise
        if 'parent_model' in self.inputs:
            parent = self.inputs.parent_model
            local_copy_list.append((parent.uuid, parent.filename, PARENT_MODEL_FILENAME))
            cmdline += ['--parent-model', PARENT_MODEL_FILENAME]
        if 'restart_checkpoint' in self.inputs:
            checkpoint = self.inputs.restart_checkpoint
            local_copy_list.append((checkpoint.uuid, checkpoint.filename, RESUME_FILENAME))
            cmdline += ['--resume', RESUME_FILENAME]

        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = cmdline
        codeinfo.stdout_name = self.metadata.options.output_filename
        codeinfo.stderr_name = rundir.STDERR
        codeinfo.withmpi = self.metadata.options.withmpi

        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = local_copy_list
        calcinfo.remote_copy_list = []
        calcinfo.retrieve_list = [
            *OUTPUT_FILENAMES,
            self.metadata.options.output_filename,
            rundir.STDERR,
            WALLTIME_MARKER,
            EXIT_STATUS_FILENAME,
            DEVICES_FILENAME,
        ]
        calcinfo.prepend_text, calcinfo.append_text = self._watchdog_texts()
        return calcinfo

    def _watchdog_texts(self) -> tuple[str, str]:
        """Job-script lines: the exit status of the training, and the walltime watchdog when a limit is set.

        The watchdog is a background subshell that sleeps until ``limit - margin`` seconds, leaves a marker file and
        sends SIGTERM to the training process only (the job script's child running ``train_cli``); the checkpoint of
        the last finished epoch is on disk (written atomically every epoch).
        """
        append = f'echo $? > {EXIT_STATUS_FILENAME}'  # first line after the command: its exit status
        devices = ''
        if self.metadata.options.get('gpus'):
            devices = f'echo "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-}}" > {DEVICES_FILENAME}\n'
        limit = self.metadata.options.get('max_wallclock_seconds')
        if not limit:
            return devices.rstrip('\n'), append
        budget = max(int(limit) - int(self.metadata.options.get('walltime_margin_seconds', 60)), 1)
        prepend = devices + (
            f'# aiida-eqml walltime watchdog: stop the training after {budget} s (limit {limit} s)\n'
            f'( sleep {budget} && touch {WALLTIME_MARKER} && pkill -TERM -P $$ -f {TRAIN_MODULE} ) &\n'
            'EQML_WATCHDOG_PID=$!'
        )
        append += '\nkill $EQML_WATCHDOG_PID 2> /dev/null || true'
        return prepend, append


def gpu_scheduler_directive(gpus: int, scheduler_type: str | None) -> str | None:
    """The job-script line that asks ``scheduler_type`` for ``gpus`` GPUs (None: no directive is known)."""
    if gpus <= 0:
        return None
    if scheduler_type == 'core.slurm':
        return f'#SBATCH --gres=gpu:{gpus}'
    return None


def validate_inputs(inputs, _):
    """Structural checks (the content checks happen in `run` so that they end with an exit code)."""
    if not inputs.get('datasets'):
        return 'at least one dataset is required in the `datasets` namespace'
