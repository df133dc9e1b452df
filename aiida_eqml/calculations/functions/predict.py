"""Prediction calcfunctions: every predicted number is linked to the model(s) that made it.

``predict_tensors(structure, **models)``
    ``eqml.model`` node(s) + ``StructureData`` -> ``ArrayData`` with one array per head, Cartesian where the head is a
    tensor (node heads ``[n, ...]``, graph heads ``[...]``, edge heads ``<name>`` ``[M, ...]`` with ``<name>_keys``
    ``[M, 5]`` = (i, j, S1, S2, S3)). With several models (an ensemble) the arrays are the mean and ``<name>_std`` the
    standard deviation over the members.

Since the model node is an output of the training CalcJob, whose inputs are the dataset nodes, which are outputs of
the harvesting calcfunctions fed by the DFT calculations, the provenance graph of a prediction reaches every
pw.x / ph.x / hp.x run that made the training labels.

The functions are node <-> array glue over :class:`aiida_eqml.ml.predict.Predictor` (the one prediction path of the
package: graphs, checks, jitted padded apply, Cartesian conversion, ensemble statistics), taken from the process-level
cache keyed by the models' file hashes, so a daemon worker that predicts in every iteration of a loop loads and
compiles a model once.

Refusals return an exit code (and no output node) with a message naming what is wrong: an element the model was
not trained on (310), models of an ensemble that disagree on species or heads (311), a model that needs inputs the
function does not provide (312), a structure no prediction means anything for (313: no atoms, non-finite or
degenerate cell, atoms on top of each other), a model without the head the function returns (314: e.g. a
Born-charge model given to ``predict_hubbard``, which would otherwise hand back the input U unchanged).
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_eqml.data.model import EqmlModelData
from aiida_eqml.ml.predict import ensemble_statistics  # noqa: F401  (one definition, re-exported)

__all__ = ('predict_tensors', 'predict_structure', 'ensemble_statistics', 'PredictionInputError')

EXIT_UNKNOWN_SPECIES = 310
EXIT_INCONSISTENT_ENSEMBLE = 311
EXIT_MISSING_MODEL_INPUTS = 312
EXIT_INVALID_STRUCTURE = 313
EXIT_MISSING_HEAD = 314


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


def _predictor(nodes: list[EqmlModelData]):
    """The process-wide Predictor of these model nodes (loaded and compiled on first use)."""
    from aiida_eqml.ml.predict import Predictor, cached_predictor

    return cached_predictor(
        [node.sha256 for node in nodes],
        lambda: Predictor([node.load() for node in nodes], names=[f'eqml.model pk={node.pk}' for node in nodes]),
    )


def _input_error(exception, nodes) -> PredictionInputError:
    """A :class:`aiida_eqml.ml.predict.PredictionError` as the exit code of the field it names."""
    status = {'species': EXIT_UNKNOWN_SPECIES, 'ensemble': EXIT_INCONSISTENT_ENSEMBLE,
              'structure': EXIT_INVALID_STRUCTURE}.get(
        exception.field, EXIT_MISSING_MODEL_INPUTS
    )
    return PredictionInputError(status, f'model(s) pk={[node.pk for node in nodes]}: {exception}')


def predict_structure(model_node: EqmlModelData, atoms, node_attrs=None, edge_attrs=None) -> dict[str, np.ndarray]:
    """``{head: array}`` for one ``ase.Atoms``: Cartesian for tensor heads, edge heads also ``<head>_keys``.

    ``node_attrs`` / ``edge_attrs`` are the raw per-atom / per-edge inputs a model config declares (as in the dataset
    record: ``{name: [n, ...]}``, ``{name: (keys [M, 5], values [M, ...])}``).
    """
    from aiida_eqml.ml.predict import PredictionError

    try:
        return _predictor([model_node]).predict(atoms, node_attrs=node_attrs, edge_attrs=edge_attrs)
    except PredictionError as exception:
        raise _input_error(exception, [model_node]) from exception


def _check_structure(atoms) -> None:
    """The ML layer's structure validation (before any neighbour list), as exit code 313."""
    from aiida_eqml.ml.structure_checks import StructureError, validate_atoms

    try:
        validate_atoms(atoms)
    except StructureError as exception:
        raise PredictionInputError(EXIT_INVALID_STRUCTURE, f'invalid structure: {exception}') from exception


def _check_heads(nodes, needed: set[str], what: str) -> None:
    for node in nodes:
        if not needed & set(node.targets):
            raise PredictionInputError(
                EXIT_MISSING_HEAD, f'model pk={node.pk} predicts {sorted(node.targets)}, none of {sorted(needed)} '
                                   f'that {what} returns')


@calcfunction
def predict_tensors(structure: orm.StructureData, **models) -> orm.ArrayData | ExitCode:
    """Model(s) + structure -> ``ArrayData`` of the predicted tensors (see the module docstring)."""
    from aiida_eqml.ml.predict import PredictionError

    atoms = structure.get_ase()
    try:
        _check_structure(atoms)
        nodes = _check_models(models, atoms.get_chemical_symbols())
        try:
            arrays = _predictor(nodes).predict(atoms)  # mean and <head>_std over an ensemble
        except PredictionError as exception:
            raise _input_error(exception, nodes) from exception
    except PredictionInputError as exception:
        return ExitCode(exception.status, str(exception))
    result = orm.ArrayData()
    for name, values in arrays.items():
        result.set_array(name, np.asarray(values))
    result.base.attributes.set('model_uuids', [node.uuid for node in nodes])
    result.base.attributes.set('target_specs', nodes[0].target_specs)
    return result


# ====================================================================== Hubbard U / V
def _unpadded(block: np.ndarray, l_rows: int, l_cols: int) -> np.ndarray:
    return np.asarray(block)[..., : 2 * l_rows + 1, : 2 * l_cols + 1]


def hubbard_record_from_nodes(structure, occupations):
    """A one-sample Hubbard record (``aiida_eqml.ml.hubbard.records``) of an scf: its geometry, occupation matrices
    and the U / V it used; no targets. The same layout as ``harvest_hubbard_labels`` writes."""
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.records import HUBBARD_TARGET_SPECS, hubbard_record_sample

    n_atoms = len(structure.sites)
    if int(occupations.base.attributes.get('nat')) != n_atoms:
        raise PredictionInputError(
            EXIT_MISSING_MODEL_INPUTS,
            f'the occupations are of a {occupations.base.attributes.get("nat")}-atom scf, '
            f'the structure has {n_atoms} atoms',
        )
    inputs = occupations.descriptor_inputs()
    site_l = inputs['site_l']
    onsite = {int(a): _unpadded(inputs['onsite'][a], site_l[a], site_l[a]) for a in np.flatnonzero(site_l >= 0)}
    u_scf = {int(a): float(inputs['hubbard_u'][a]) for a in onsite}
    intersite, v_scf = {}, {}
    for k, key in enumerate(np.asarray(inputs['intersite_keys'], dtype=np.int64).tolist()):
        intersite[tuple(key)] = _unpadded(inputs['intersite'][k], site_l[key[0]], site_l[key[1]])
        v_scf[tuple(key)] = float(inputs['hubbard_v'][k])
    width = max(5, int(np.asarray(inputs['onsite']).shape[-1]))
    sample = hubbard_record_sample(
        structure.get_ase(), onsite, u_scf, intersite=intersite or None, hubbard_v_scf=v_scf or None, width=width,
        info={'structure_uuid': structure.uuid, 'occupations_uuid': occupations.uuid},
    )
    return Dataset([sample], {'hubbard_u': HUBBARD_TARGET_SPECS['hubbard_u']})


@calcfunction
def predict_hubbard(hubbard_structure, occupations, **models):
    """Model(s) + ``HubbardStructureData`` + its scf's ``eqml.occupations`` -> ``{'hubbard_structure', 'spread'}``.

    The output structure is the input one with every on-site U and inter-site V of its Hubbard parameters replaced by
    the (ensemble mean) prediction; manifolds, projectors and formulation are kept. ``spread`` (Dict) holds, per
    parameter, the atoms, the mean, the standard deviation over the ensemble members and the input value.
    """
    from aiida_eqml.ml.predict import PredictionError

    atoms = hubbard_structure.get_ase()
    try:
        _check_structure(atoms)
        _check_heads([m for m in models.values() if isinstance(m, EqmlModelData)], {'hubbard_u', 'hubbard_v'},
                     'predict_hubbard')  # before the species: a Born-charge model is the wrong kind of model
        nodes = _check_models(models, atoms.get_chemical_symbols())
        record = hubbard_record_from_nodes(hubbard_structure, occupations)
        try:  # each member reads the occupations through the descriptor slots stored in its model file
            prediction = _predictor(nodes).predict_hubbard(record)[0]  # mean, <name>_std
        except PredictionError as exception:
            raise _input_error(exception, nodes) from exception
    except PredictionInputError as exception:
        return ExitCode(exception.status, str(exception))

    v_keys = np.asarray(prediction.get('hubbard_v_keys', np.zeros((0, 5))), dtype=np.int64).tolist()
    v_index = {tuple(key): index for index, key in enumerate(v_keys)}

    hubbard = hubbard_structure.hubbard
    spread = []
    for parameter in hubbard.parameters:
        i, j, shift = parameter.atom_index, parameter.neighbour_index, tuple(parameter.translation)
        onsite = i == j and shift == (0, 0, 0)
        if onsite and 'hubbard_u' in prediction and np.isfinite(prediction['hubbard_u'][i]):
            mean, std = prediction['hubbard_u'][i], prediction['hubbard_u_std'][i]
        elif not onsite and (i, j, *shift) in v_index:
            k = v_index[(i, j, *shift)]
            mean, std = prediction['hubbard_v'][k], prediction['hubbard_v_std'][k]
        else:
            continue  # this model does not predict that parameter: keep the input value
        entry = {
            'kind': 'U' if onsite else 'V', 'atom_index': i, 'neighbour_index': j, 'translation': list(shift),
            'manifolds': [parameter.atom_manifold, parameter.neighbour_manifold],
            'input': float(parameter.value), 'mean': float(mean), 'std': float(std),
        }
        spread.append(entry)
        parameter.value = float(mean)
    predicted = hubbard_structure.clone()
    predicted.hubbard = hubbard
    return {
        'hubbard_structure': predicted,
        'spread': orm.Dict({'n_members': len(nodes), 'model_uuids': [n.uuid for n in nodes], 'parameters': spread}),
    }


def warm_up_hubbard(hubbard_structure, models: dict, hubbard_l: dict[int, int], couples: list[tuple]) -> None:
    """Load and compile, in a background thread, the Predictor that ``predict_hubbard`` will use on scf runs of this
    structure (:func:`aiida_eqml.ml.predict.warm_up_in_background`), for Hubbard manifolds of angular momentum
    ``hubbard_l[atom]`` and V ``couples`` (i, j, S1, S2, S3): the ML Hubbard loop calls it when its first scf starts,
    so that the first prediction does not add the model's loading and compilation to the loop's time.

    Everything read through the ORM (model files, with their hash check; the structure) is read here, in the
    caller's thread, and only when the process has not loaded these models yet. A failure is logged and ignored:
    the calcfunction then loads the models and reports it."""
    import logging

    from aiida_eqml.ml.hubbard.models import shape_record
    from aiida_eqml.ml.predict import Predictor, is_cached, warm_up_in_background

    try:
        nodes = _check_models(models, hubbard_structure.get_symbols_set())
        sha256s = [node.sha256 for node in nodes]
        members = None if is_cached(sha256s) else [node.load() for node in nodes]
        names = [f'eqml.model pk={node.pk}' for node in nodes]
        record = shape_record(hubbard_structure.get_ase(), hubbard_l, couples)
    except Exception as exception:  # noqa: BLE001 - an optimisation only; the prediction step reports errors
        logging.getLogger(__name__).warning('no prediction warm-up: %s', exception)
        return
    warm_up_in_background(sha256s, lambda: Predictor(members, names=names),
                          lambda predictor: predictor.predict_hubbard(record))


__all__ += ('predict_hubbard', 'hubbard_record_from_nodes', 'warm_up_hubbard')
