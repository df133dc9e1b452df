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
            f'the occupations are of a {occupations.base.attributes.get("nat")}-atom scf, the structure has {n_atoms} atoms',
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


def _model_descriptor_dataset(record, model_node: EqmlModelData, config: dict, metadata: dict):
    """The record with the descriptors this model reads (same manifold / pair slots as in its training)."""
    import e3nn_jax as e3nn

    from aiida_eqml.ml.hubbard.records import PAIR_ATTR, SITE_ATTR, hubbard_training_dataset
    from aiida_eqml.ml.hubbard.training import descriptor_slots

    # The slots train_cli stored; older models without them read the record's own.
    manifold_ls, pair_ls = descriptor_slots(
        record, metadata.get('hubbard'), with_pairs=PAIR_ATTR in (config.get('edge_attrs') or {})
    )
    dataset, attrs = hubbard_training_dataset(record, manifold_ls, pair_ls)
    for group in ('node_attrs', 'edge_attrs'):
        for name, irreps in (config.get(group) or {}).items():
            if name in (SITE_ATTR, PAIR_ATTR) and e3nn.Irreps(attrs[group].get(name, '')) != e3nn.Irreps(irreps):
                raise PredictionInputError(
                    EXIT_MISSING_MODEL_INPUTS,
                    f'model pk={model_node.pk} reads {name} with irreps {irreps}, the occupations of this scf give '
                    f'{attrs[group].get(name)} (Hubbard manifolds l={manifold_ls}, pairs {pair_ls}): not the kind of '
                    'system it was trained on',
                )
    return dataset


@calcfunction
def predict_hubbard(hubbard_structure, occupations, **models):
    """Model(s) + ``HubbardStructureData`` + its scf's ``eqml.occupations`` -> ``{'hubbard_structure', 'spread'}``.

    The output structure is the input one with every on-site U and inter-site V of its Hubbard parameters replaced by
    the (ensemble mean) prediction; manifolds, projectors and formulation are kept. ``spread`` (Dict) holds, per
    parameter, the atoms, the mean, the standard deviation over the ensemble members and the input value.
    """
    from aiida_eqml.ml.hubbard.models import predict_hubbard as predict_hubbard_ml

    atoms = hubbard_structure.get_ase()
    try:
        nodes = _check_models(models, atoms.get_chemical_symbols())
        record = hubbard_record_from_nodes(hubbard_structure, occupations)
        members = []
        for node in nodes:
            model, params, metadata = node.load()
            dataset = _model_descriptor_dataset(record, node, metadata['config'], metadata)
            members.append(predict_hubbard_ml(model, params, dataset)[0])
    except PredictionInputError as exception:
        return ExitCode(exception.status, str(exception))

    u_members = np.stack([m['hubbard_u'] for m in members]) if 'hubbard_u' in members[0] else None
    v_members = {}
    for member in members:
        if 'hubbard_v' in member:
            keys, values = member['hubbard_v']
            for key, value in zip(np.asarray(keys).tolist(), values):
                v_members.setdefault(tuple(int(k) for k in key), []).append(float(value))

    hubbard = hubbard_structure.hubbard
    spread = []
    for parameter in hubbard.parameters:
        i, j, shift = parameter.atom_index, parameter.neighbour_index, tuple(parameter.translation)
        onsite = i == j and shift == (0, 0, 0)
        if onsite and u_members is not None and np.all(np.isfinite(u_members[:, i])):
            values = u_members[:, i]
        elif not onsite and (i, j, *shift) in v_members:
            values = np.array(v_members[(i, j, *shift)])
        else:
            continue  # this model does not predict that parameter: keep the input value
        entry = {
            'kind': 'U' if onsite else 'V', 'atom_index': i, 'neighbour_index': j, 'translation': list(shift),
            'manifolds': [parameter.atom_manifold, parameter.neighbour_manifold],
            'input': float(parameter.value), 'mean': float(values.mean()), 'std': float(values.std()),
        }
        spread.append(entry)
        parameter.value = float(values.mean())
    predicted = hubbard_structure.clone()
    predicted.hubbard = hubbard
    return {
        'hubbard_structure': predicted,
        'spread': orm.Dict({'n_members': len(nodes), 'model_uuids': [n.uuid for n in nodes], 'parameters': spread}),
    }


__all__ += ('predict_hubbard', 'hubbard_record_from_nodes')
