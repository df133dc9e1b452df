"""``aiida-eqml train`` and ``aiida-eqml predict``: the ML layer from the command line, without an AiiDA profile.

Only click is imported here; the commands import :mod:`aiida_eqml.ml` (which never imports aiida) when they run.
"""
from __future__ import annotations

import os
import sys

import click

from . import exception_text


@click.command('train')
@click.argument('dataset', type=click.Path(dir_okay=False))
@click.argument('config', type=click.Path(dir_okay=False))
@click.option(
    '-o',
    '--out',
    required=True,
    type=click.Path(file_okay=False),
    help='Output directory (model.eqml, metrics.json, logs, checkpoint).',
)
@click.option(
    '--resume',
    type=click.Path(dir_okay=False),
    help='checkpoint.msgpack of an interrupted run with the same dataset and config.',
)
@click.option(
    '--parent-model',
    type=click.Path(dir_okay=False),
    help='Model file to fine-tune (species, architecture, normalisation kept).',
)
@click.option('--no-progress', is_flag=True, help='No progress bar.')
def train(dataset, config, out, resume, parent_model, no_progress):
    """Train a model on DATASET (.npz, aiida_eqml.ml.dataset) with the training CONFIG (JSON).

    The same run as `python -m aiida_eqml.ml.train_cli` (what the eqml.train CalcJob starts), with the same exit codes:
    0 completed, 1 unexpected error, 2 invalid input, 3 NaN loss, 4 divergence.
    """
    from aiida_eqml.ml import rundir
    from aiida_eqml.ml.train_cli import train_command

    code = train_command(dataset, config, out, resume=resume, parent_model=parent_model, progress=not no_progress)
    try:
        metrics = rundir.read_metrics(out)
    except (OSError, ValueError):
        metrics = {}
    if code == 0:
        click.echo(
            f'{os.path.join(out, rundir.MODEL)}: {metrics.get("epochs_run")} epoch(s), '
            f'best epoch {metrics.get("best_epoch")}'
        )
    else:
        click.echo(
            f'training failed ({metrics.get("status", "error")}), see {os.path.join(out, rundir.METRICS)}', err=True
        )
    sys.exit(code)


@click.command('predict')
@click.argument('model', type=click.Path(exists=True))
@click.argument('structures', nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option('-o', '--output', required=True, type=click.Path(dir_okay=False), help='Output file (extended XYZ).')
@click.option(
    '--format', 'input_format', default=None, help='ASE format of the inputs (default: guessed from the file names).'
)
@click.option('--batch-size', default=8, show_default=True, help='Structures padded and evaluated together.')
@click.option('--no-progress', is_flag=True, help='No progress bar.')
def predict(model, structures, output, input_format, batch_size, no_progress):
    """Predict every head of MODEL for every frame of STRUCTURES (any file ASE reads) into an extended XYZ file.

    MODEL is a model file (.eqml), an ensemble directory (ensemble.json) or a directory of .eqml files (then each
    value is the ensemble mean and <name>_std the spread). Energy, forces and stress are written as the calculator
    results of each frame, per-atom heads as per-atom columns (tensors flattened row-major: born_charges has 9
    columns), the other heads in the frame's info (flattened).
    """
    import ase.io
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    from aiida_eqml.ml.calculator import EqmlCalculator
    from aiida_eqml.ml.modelfile import ModelFileError
    from aiida_eqml.ml.predict import PredictionError, load_predictor

    try:
        predictor = load_predictor(model, batch_size=batch_size)
    except (ModelFileError, FileNotFoundError, ValueError) as exception:
        message = str(exception)  # the model file errors name the file already
        raise click.ClickException(message if str(model) in message else f'{model}: {message}') from exception
    frames = []
    for path in structures:
        try:
            frames.extend(ase.io.read(path, index=':', format=input_format))
        except Exception as exception:  # ASE raises many types for unreadable files
            raise click.ClickException(
                f'{path}: not a structure file ASE can read ({exception_text(exception)})'
            ) from exception
    calculator = EqmlCalculator(predictor)
    written = []
    try:
        for atoms, out in predictor.iter_predict(frames, progress=not no_progress):
            atoms = atoms.copy()
            results = calculator.to_results(out)
            standard = {k: results.pop(k) for k in ('energy', 'free_energy', 'forces', 'stress') if k in results}
            for name, value in results.items():
                value = np.asarray(value)
                if calculator.per_atom(name):
                    atoms.arrays[name] = value.reshape(len(atoms), -1) if value.ndim > 2 else value
                else:
                    atoms.info[name] = value.reshape(-1) if value.ndim else float(value)
            atoms.calc = SinglePointCalculator(atoms, **standard)
            written.append(atoms)
    except PredictionError as exception:
        raise click.ClickException(str(exception)) from exception
    ase.io.write(output, written, format='extxyz')
    click.echo(f'{output}: {len(written)} structure(s), heads {", ".join(predictor.heads)}')

