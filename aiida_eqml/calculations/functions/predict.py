"""Prediction calcfunctions: every predicted number is linked to the model(s) that made it.

``predict_tensors(structure, **models)``
    ``eqml.model`` node(s) + ``StructureData`` -> ``ArrayData`` with one array per head, Cartesian where the head is a
    tensor (node heads ``[n, ...]``, graph heads ``[...]``, edge heads ``<name>`` ``[M, ...]`` with ``<name>_keys``
    ``[M, 5]`` = (i, j, S1, S2, S3)). With several models (an ensemble) the arrays are the mean and ``<name>_std`` the
    standard deviation over the members.

Since the model node is an output of the training CalcJob, whose inputs are the dataset nodes, which are outputs of
the harvesting calcfunctions fed by the DFT calculations, the provenance graph of a prediction reaches every
pw.x / ph.x / hp.x run that made the training labels.

Refusals return an exit code (and no output node) with a message naming what is wrong: an element the model was
not trained on (310), models of an ensemble that disagree on species or heads (311), a model that needs inputs the
function does not provide (312).
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_eqml.data.model import EqmlModelData

__all__ = ('predict_tensors', 'predict_structure', 'ensemble_statistics', 'PredictionInputError')

EXIT_UNKNOWN_SPECIES = 310
EXIT_INCONSISTENT_ENSEMBLE = 311
EXIT_MISSING_MODEL_INPUTS = 312


class PredictionInputError(ValueError):
    """Inputs the model cannot predict for; ``status`` is the calcfunction's exit status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _check_models(models: dict, symbols) -> list[EqmlModelData]:
    if not models:
        raise PredictionInputError(EXIT_INCONSISTENT_ENSEMBLE, 'no model given')
    for key in sorted(models):
        if not isinstance(models[key], EqmlModelData):
            raise PredictionInputError(
                EXIT_INCONSISTENT_ENSEMBLE, f'`{key}` is a {type(models[key]).__name__}, not an eqml.model'
            )
    nodes = [models[key] for key in sorted(models)]
    for key, node in zip(sorted(models), nodes):
        unknown = sorted(set(symbols) - set(node.species))
        if unknown:
            raise PredictionInputError(
                EXIT_UNKNOWN_SPECIES,
                f'model `{key}` (eqml.model pk={node.pk}) was trained on species {node.species}; the structure '
                f'contains element(s) {unknown} it has never seen',
            )
    reference = nodes[0]
    for key, node in zip(sorted(models), nodes):
        if node.targets != reference.targets:
            raise PredictionInputError(
                EXIT_INCONSISTENT_ENSEMBLE,
                f'ensemble members predict different heads: `{key}` {node.targets} vs {reference.targets}',
            )
    return nodes


def predict_structure(model_node: EqmlModelData, atoms, node_attrs=None, edge_attrs=None) -> dict[str, np.ndarray]:
    """``{head: array}`` for one ``ase.Atoms``: Cartesian for tensor heads, edge heads also ``<head>_keys``.

    ``node_attrs`` / ``edge_attrs`` are the raw per-atom / per-edge inputs a model config declares (as in the dataset
    record: ``{name: [n, ...]}``, ``{name: (keys [M, 5], values [M, ...])}``).
    """
    import e3nn_jax as e3nn

    from aiida_eqml.ml.graph import PaddingBuckets, graph_from_atoms
    from aiida_eqml.ml.tensors import tensor_type

    model, params, metadata = model_node.load()
    config = metadata['config']
    node_attrs, edge_attrs = dict(node_attrs or {}), dict(edge_attrs or {})
    missing = sorted(set(config.get('node_attrs') or {}) - set(node_attrs)) + sorted(
        set(config.get('edge_attrs') or {}) - set(edge_attrs)
    )
    if missing:
        raise PredictionInputError(
            EXIT_MISSING_MODEL_INPUTS,
            f'model pk={model_node.pk} needs the input attribute(s) {missing}, which this prediction does not provide',
        )
    n_atoms = len(atoms)
    graph = graph_from_atoms(
        atoms,
        float(config['cutoff']),
        list(config['species']),
        node_attrs={
            name: e3nn.IrrepsArray(irreps, np.asarray(node_attrs[name], np.float64).reshape(n_atoms, -1))
            for name, irreps in (config.get('node_attrs') or {}).items()
        },
        edge_attrs={
            name: (np.asarray(edge_attrs[name][0]), e3nn.IrrepsArray(irreps, np.asarray(edge_attrs[name][1], np.float64).reshape(len(edge_attrs[name][0]), -1)))
            for name, irreps in (config.get('edge_attrs') or {}).items()
        },
    )
    n_edges = int(np.sum(graph.n_edge))
    padded = PaddingBuckets()([graph])  # real entries first, then padding (sliced off below)
    outputs = model.apply(params, padded)
    specs = metadata.get('target_specs') or {}
    result = {}
    for name, head in model.heads.items():
        values = np.asarray(outputs[name].array, np.float64)
        spec = specs.get(name, {})
        ttype = tensor_type(spec['tensor']) if 'tensor' in spec else head.tensor
        if ttype is not None:
            values = np.asarray(ttype.to_cartesian(values), np.float64)
        if head.level == 'node':
            result[name] = values[:n_atoms]
        elif head.level == 'graph':
            result[name] = values[0]
        else:
            result[name] = values[:n_edges]
            result[f'{name}_keys'] = np.concatenate(
                [np.asarray(graph.senders)[:, None], np.asarray(graph.receivers)[:, None], np.rint(np.asarray(graph.shifts)).astype(np.int64)],
                axis=1,
            ).astype(np.int64)
    return result


def ensemble_statistics(predictions: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean of each array over the members, ``<name>_std`` the (population) standard deviation; keys unchanged."""
    out = {}
    for name in predictions[0]:
        if name.endswith('_keys'):
            out[name] = predictions[0][name]
            continue
        stack = np.stack([p[name] for p in predictions])
        out[name] = stack.mean(axis=0)
        if len(predictions) > 1:
            out[f'{name}_std'] = stack.std(axis=0)
    return out


@calcfunction
def predict_tensors(structure: orm.StructureData, **models) -> orm.ArrayData | ExitCode:
    """Model(s) + structure -> ``ArrayData`` of the predicted tensors (see the module docstring)."""
    atoms = structure.get_ase()
    try:
        nodes = _check_models(models, atoms.get_chemical_symbols())
        predictions = [predict_structure(node, atoms) for node in nodes]
    except PredictionInputError as exception:
        return ExitCode(exception.status, str(exception))
    arrays = ensemble_statistics(predictions)
    result = orm.ArrayData()
    for name, values in arrays.items():
        result.set_array(name, np.asarray(values))
    result.base.attributes.set('model_uuids', [node.uuid for node in nodes])
    result.base.attributes.set('target_specs', nodes[0].target_specs)
    return result
