"""Parser of ``eqml.train``: model node, metrics, learning curve and checkpoint from the retrieved files.

The training process (``aiida_eqml.ml.train_cli``) writes ``metrics.json`` with a ``status`` at the end of every run,
successful or not; its absence means the process was stopped from outside (walltime watchdog, scheduler, node
failure). The checkpoint and the learning curve are attached whenever they exist, so an interrupted or failed run can
be resumed or inspected; the model only when the run completed and its file passes the integrity checks.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile

import numpy as np
from aiida import orm
from aiida.parsers import Parser

from aiida_eqml.calculations.train import EXIT_STATUS_FILENAME, WALLTIME_MARKER
from aiida_eqml.data.model import EqmlModelData, json_safe
from aiida_eqml.ml import rundir

__all__ = ('EqmlTrainParser', 'learning_curve_arrays')

#: train_cli ``status`` -> exit code of the CalcJob.
STATUS_EXIT_CODES = {
    'invalid_input': 'ERROR_INVALID_INPUT',
    'nan_loss': 'ERROR_NAN_LOSS',
    'diverged': 'ERROR_DIVERGED',
    'error': 'ERROR_TRAINING_FAILED',
}


def learning_curve_arrays(csv_text: str) -> dict[str, np.ndarray]:
    """``{column: [n_epochs] float}`` from ``log.csv`` (empty cells -> NaN)."""
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    if not rows:
        return {}
    columns = list(rows[0])

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return np.nan

    return {column: np.array([number(row.get(column)) for row in rows]) for column in columns}


class EqmlTrainParser(Parser):
    """Turn the files of a training run into output nodes and an exit code."""

    def parse(self, **kwargs):
        retrieved = self.retrieved
        names = set(retrieved.base.repository.list_object_names())
        walltime = (WALLTIME_MARKER in names or self._killed_at_time_limit(names)
                    or self.node.exit_status == self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status)

        if rundir.CHECKPOINT in names:
            with retrieved.base.repository.open(rundir.CHECKPOINT, 'rb') as handle:
                self.out('checkpoint', orm.SinglefileData(handle, filename=rundir.CHECKPOINT))
        if rundir.LOG_CSV in names:
            arrays = learning_curve_arrays(retrieved.base.repository.get_object_content(rundir.LOG_CSV))
            if arrays:
                curve = orm.ArrayData()
                for column, values in arrays.items():
                    curve.set_array(column, values)
                self.out('learning_curve', curve)

        if rundir.METRICS not in names:
            if walltime:
                return self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME
            return self.exit_codes.ERROR_INTERRUPTED.format(message=self._tail_of_stderr(names))
        try:
            metrics = json.loads(retrieved.base.repository.get_object_content(rundir.METRICS))
        except json.JSONDecodeError as exception:
            return self.exit_codes.ERROR_INTERRUPTED.format(message=f'metrics.json is not valid JSON ({exception})')

        status = metrics.get('status')
        if status != 'completed':
            exit_code = STATUS_EXIT_CODES.get(status, 'ERROR_TRAINING_FAILED')
            message = str(metrics.get('message') or self._tail_of_stderr(names))
            # Keep the report short: train_cli puts the traceback in the message of unexpected errors.
            return self.exit_codes[exit_code].format(
                message=message.strip().splitlines()[-1] if message.strip() else status
            )

        if rundir.MODEL not in names:
            return self.exit_codes.ERROR_CORRUPT_MODEL_OUTPUT.format(
                message='metrics.json says completed but model.eqml is missing'
            )
        with tempfile.TemporaryDirectory(prefix='eqml-parse-') as scratch:
            path = os.path.join(scratch, rundir.MODEL)
            with open(path, 'wb') as handle:
                handle.write(retrieved.base.repository.get_object_content(rundir.MODEL, mode='rb'))
            try:
                model = EqmlModelData(filepath=path)
            except ValueError as exception:  # ModelFileError is a ValueError
                return self.exit_codes.ERROR_CORRUPT_MODEL_OUTPUT.format(message=str(exception))
        if metrics.get('model_sha256') and metrics['model_sha256'] != model.sha256:
            return self.exit_codes.ERROR_CORRUPT_MODEL_OUTPUT.format(
                message=f'model.eqml has sha256 {model.sha256}, the training wrote {metrics["model_sha256"]}'
            )
        self.out('model', model)
        self.out('metrics', orm.Dict(json_safe(metrics)))
        return None

    def _killed_at_time_limit(self, names: set[str]) -> bool:
        """Slurm's ``*** JOB n ON host CANCELLED AT t DUE TO TIME LIMIT ***`` anywhere in the scheduler stderr.

        aiida-core's Slurm plugin matches it only on the first line of the file (``re.match`` without DOTALL) and
        reads ``sacct``, which needs accounting: a job killed at its limit after writing anything to stderr would
        otherwise be reported as interrupted (300) instead of out of walltime (120).
        """
        filename = self.node.get_option('scheduler_stderr')
        if not filename or filename not in names:
            return False
        text = self.retrieved.base.repository.get_object_content(filename, mode='r')
        return re.search(r'cancelled at .* due to time limit', text, flags=re.IGNORECASE) is not None

    def _tail_of_stderr(self, names: set[str]) -> str:
        parts = []
        if EXIT_STATUS_FILENAME in names:
            parts.append(
                f'exit status {self.retrieved.base.repository.get_object_content(EXIT_STATUS_FILENAME).strip()}'
            )
        if rundir.STDERR in names:
            lines = [
                line
                for line in self.retrieved.base.repository.get_object_content(rundir.STDERR).splitlines()
                if line.strip()
            ]
            if lines:
                parts.append(lines[-1])
        return '; '.join(parts) or 'no stderr'
