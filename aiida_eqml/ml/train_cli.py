"""Command-line training entry point (what the AiiDA training CalcJob runs on a cluster)::

    python -m aiida_eqml.ml.train_cli --dataset D.npz --config C.json --out DIR \\
        [--resume CKPT] [--parent-model M] [--no-progress]

Writes into ``DIR`` the files of the run-directory contract (:mod:`aiida_eqml.ml.rundir`: ``model.eqml``,
``metrics.json``, ``log.csv`` / ``log.json``, ``checkpoint.msgpack``).

Exit codes (:data:`aiida_eqml.ml.rundir.EXIT_CODES`; ``metrics.json`` carries the same ``status`` and the message):
0 completed, 2 invalid input (dataset/config/parent/checkpoint), 3 NaN loss, 4 divergence,
1 anything unexpected.

Datasets that need preparing before the generic trainer sees them (a Hubbard record's occupation matrices become
descriptors) are handled by the first matching entry of :data:`DATASET_PREPARERS`, the trainer's extension point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from aiida_eqml.ml import rundir
from aiida_eqml.ml.rundir import EXIT_CODES

# Reported as "invalid input" (exit 2): DatasetError, ModelFileError, StructureError and ConfigError are ValueErrors
# naming file, field and value; listed for the reader, ValueError covers them.
INVALID_INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, IsADirectoryError, UnicodeDecodeError)
# The names of the run-directory contract, kept here for the callers that imported them from this module.
MODEL_FILENAME = rundir.MODEL
METRICS_FILENAME = rundir.METRICS
CHECKPOINT_FILENAME = rundir.CHECKPOINT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aiida_eqml.ml.train_cli", description="Train an aiida-eqml model.")
    parser.add_argument("--dataset", required=True, help="dataset .npz (aiida_eqml.ml.dataset.Dataset.save)")
    parser.add_argument(
        "--config", required=True, help="training config JSON (see aiida_eqml.ml.training.DEFAULT_TRAINING_CONFIG)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", help="checkpoint.msgpack of an interrupted run with the same dataset and config")
    parser.add_argument("--parent-model", help="model file to fine-tune (species, architecture, normalisation kept)")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return parser


_write_json = rundir.write_json


def run(args: argparse.Namespace) -> int:
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.modelfile import file_sha256, load_model, save_model
    from aiida_eqml.ml.preparation import prepare_training
    from aiida_eqml.ml.training import DivergenceError, NaNLossError, train

    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, METRICS_FILENAME)
    started = time.time()

    def finish(status: str, message: str = "", **extra) -> int:
        _write_json(metrics_path, {"status": status, "message": message, "wall_time_s": time.time() - started, **extra})
        if status != "completed":
            print(f"train_cli: {status}: {message}", file=sys.stderr)
        return EXIT_CODES[status]

    try:
        with open(args.config) as handle:
            config = json.load(handle)
        if not isinstance(config, dict):
            raise ValueError(f"{args.config}: the training config must be a JSON object")
        if args.no_progress:
            config["progress"] = False
        dataset = Dataset.load(args.dataset)
        parent = None
        parent_info = None
        if args.parent_model:
            _, parent_params, parent_meta = load_model(args.parent_model)
            parent = (parent_meta["config"], parent_params)
            parent_info = {"path": os.path.abspath(args.parent_model), "sha256": file_sha256(args.parent_model)}
        if args.resume and not os.path.exists(args.resume):
            raise FileNotFoundError(f"--resume: {args.resume} does not exist")
        # Domain datasets (a Hubbard record's occupations -> descriptors, U/V heads) through the extension point.
        prepared = prepare_training(dataset, config, parent_meta if args.parent_model else None)
        dataset, config = prepared.dataset, prepared.config
    except INVALID_INPUT_ERRORS as exc:  # json.JSONDecodeError is a ValueError
        return finish("invalid_input", f"{type(exc).__name__}: {exc}")

    try:
        result = train(dataset, config, args.out, resume=args.resume, parent=parent)
    except NaNLossError as exc:
        return finish("nan_loss", str(exc))
    except DivergenceError as exc:
        return finish("diverged", str(exc))
    except INVALID_INPUT_ERRORS as exc:
        return finish("invalid_input", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())

    metadata = {
        "target_specs": {k: v for k, v in dataset.target_specs.items() if k in result.model.heads},
        "training_config": config,
        "metrics": result.metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "dataset_sha256": file_sha256(args.dataset),
        "parent_model": parent_info,
    }
    metadata.update(prepared.metadata)  # e.g. the Hubbard descriptor slots and protocol prediction reads
    model_path = os.path.join(args.out, MODEL_FILENAME)
    model_sha = save_model(model_path, result.model_config, result.params, metadata)
    return finish(
        "completed",
        metrics=result.metrics,
        split=result.split,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        stopped_early=result.stopped_early,
        model_file=MODEL_FILENAME,
        model_sha256=model_sha,
        final_train_loss=result.history[-1]["train_loss"] if result.history else None,
        best_val_loss=min((r["val_loss"] for r in result.history), default=None),
    )


def train_command(dataset, config, out, resume=None, parent_model=None, progress: bool = True) -> int:
    """The training run both command lines make (``python -m aiida_eqml.ml.train_cli``, which the ``eqml.train``
    CalcJob runs, and ``aiida-eqml train``): writes ``out`` (see the module docstring), returns the exit code."""
    args = argparse.Namespace(
        dataset=os.fspath(dataset),
        config=os.fspath(config),
        out=os.fspath(out),
        resume=None if resume is None else os.fspath(resume),
        parent_model=None if parent_model is None else os.fspath(parent_model),
        no_progress=not progress,
    )
    try:
        return run(args)
    except Exception:  # unexpected: keep the traceback for the CalcJob's stderr
        traceback.print_exc()
        try:
            _write_json(
                os.path.join(args.out, METRICS_FILENAME), {"status": "error", "message": traceback.format_exc()}
            )
        except OSError:
            pass
        return EXIT_CODES["error"]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return train_command(args.dataset, args.config, args.out, args.resume, args.parent_model, not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
