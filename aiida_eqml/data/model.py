"""``eqml.model``: one trained model file (:mod:`aiida_eqml.ml.modelfile`) in a node's repository.

The file is validated before it enters the repository (magic header, format version, the sha256 over config, weights
and metadata, the config against the model schema, the weights against the layers it builds: what
:func:`aiida_eqml.ml.modelfile.load_model` checks), so a stored ``eqml.model`` node always holds a loadable model.
Queryable attributes describe it without opening it::

    QueryBuilder().append(EqmlModelData, filters={'attributes.species': {'contains': ['Ni']},
                                                  'attributes.targets': {'contains': ['hubbard_u']}})

``sha256`` is the hash of the file's bytes (what ``sha256sum model.eqml`` prints); ``content_sha256`` the hash of
what determines predictions (config + weights, no metadata). :meth:`EqmlModelData.get_or_create` returns the stored
node with the same file instead of storing a duplicate. A training CalcJob always creates its own output node (a node
has exactly one creator), so two trainings that happen to write identical files give two nodes with equal ``sha256``.
"""
from __future__ import annotations

import math
import os
import tempfile

from aiida import orm
from aiida.common.exceptions import NotExistent

from aiida_eqml.ml.modelfile import ModelFileError, file_sha256, read_model_file

__all__ = ('EqmlModelData', 'load_model_node', 'json_safe')

FILENAME = 'model.eqml'


def json_safe(value):
    """``value`` with NaN/inf replaced by None and tuples by lists: AiiDA attributes are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, 'item') and not isinstance(value, (str, bytes)):  # numpy scalar
        return json_safe(value.item())
    return value


def _summary_attributes(path: str) -> dict:
    """Attributes describing the model file at ``path`` (raises :class:`ModelFileError` unless it loads as a model)."""
    from aiida_eqml.ml.modelfile_checks import build_checked_model

    config, params, metadata = read_model_file(path)
    build_checked_model(path, config, params)  # what load_model does, without moving the weights to jax arrays
    heads = metadata.get('heads') or {
        name: {'level': spec.get('level')} for name, spec in (config.get('heads') or {}).items()
    }
    metrics = metadata.get('metrics') or {}
    return {
        'filename': FILENAME,
        'sha256': file_sha256(path),
        'content_sha256': metadata.get('content_sha256'),
        'package_version': metadata.get('package_version_saved'),
        'architecture': config.get('architecture', 'nequip'),
        'species': list(config.get('species') or []),
        'cutoff': config.get('cutoff'),
        'targets': sorted(heads),
        'heads': json_safe(heads),
        'target_specs': json_safe(metadata.get('target_specs') or {}),
        'node_attrs': json_safe(config.get('node_attrs') or {}),
        'edge_attrs': json_safe(config.get('edge_attrs') or {}),
        'test_metrics': json_safe(metrics.get('test') or {}),
        'metrics': json_safe(metrics),
        'best_epoch': metadata.get('best_epoch'),
        'epochs_run': metadata.get('epochs_run'),
        'dataset_sha256': metadata.get('dataset_sha256'),
    }


class EqmlModelData(orm.Data):
    """A trained equivariant model: the self-describing model file plus queryable attributes.

    ``EqmlModelData(filepath='model.eqml')`` reads and checks the file first: a corrupt, truncated or foreign file
    raises :class:`aiida_eqml.ml.modelfile.ModelFileError` naming what is wrong, and no node is made.
    """

    def __init__(self, filepath: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if filepath is None:
            raise ValueError(
                'EqmlModelData needs `filepath`: a model file written by aiida_eqml.ml.modelfile.save_model'
            )
        path = os.fspath(filepath)
        attributes = _summary_attributes(path)
        self.base.repository.put_object_from_file(path, FILENAME)
        for key, value in attributes.items():
            self.base.attributes.set(key, value)

    # ---------------------------------------------------------------- queryable summary
    @property
    def sha256(self) -> str:
        """sha256 of the file's bytes."""
        return self.base.attributes.get('sha256')

    @property
    def content_sha256(self) -> str | None:
        """sha256 of config + weights (what determines the predictions)."""
        return self.base.attributes.get('content_sha256')

    @property
    def species(self) -> list[str]:
        return self.base.attributes.get('species')

    @property
    def targets(self) -> list[str]:
        """Names of the model's heads (what it predicts)."""
        return self.base.attributes.get('targets')

    @property
    def heads(self) -> dict:
        return self.base.attributes.get('heads')

    @property
    def target_specs(self) -> dict:
        """Cartesian target specs (``level``, ``tensor``/``irreps``, ``unit``) of the trained heads."""
        return self.base.attributes.get('target_specs')

    @property
    def architecture(self) -> str:
        return self.base.attributes.get('architecture')

    @property
    def cutoff(self) -> float:
        return self.base.attributes.get('cutoff')

    @property
    def test_metrics(self) -> dict:
        return self.base.attributes.get('test_metrics')

    @property
    def filename(self) -> str:
        return self.base.attributes.get('filename')

    # ---------------------------------------------------------------- content
    def read(self) -> tuple[dict, dict, dict]:
        """``(config, params as numpy tree, metadata)`` of the stored file, integrity checked."""
        with self.base.repository.as_path(self.filename) as path:
            return read_model_file(path)

    def load(self):
        """``(model, params, metadata)`` as :func:`aiida_eqml.ml.modelfile.load_model` returns them."""
        from aiida_eqml.ml.modelfile import load_model

        with self.base.repository.as_path(self.filename) as path:
            return load_model(path)

    def export(self, path: str | os.PathLike) -> None:
        """Copy the model file out of the repository (byte for byte: same ``sha256``)."""
        with open(os.fspath(path), 'wb') as handle:
            handle.write(self.base.repository.get_object_content(self.filename, mode='rb'))

    def check_species(self, symbols) -> None:
        """Raise ValueError naming the elements of ``symbols`` this model was not trained on."""
        unknown = sorted(set(symbols) - set(self.species))
        if unknown:
            raise ValueError(
                f'the model (eqml.model {self.pk if self.is_stored else "unstored"}) was trained on species '
                f'{self.species}; it cannot predict for element(s) {unknown}'
            )

    # ---------------------------------------------------------------- deduplication
    @classmethod
    def find_by_sha256(cls, sha256: str) -> EqmlModelData | None:
        """The oldest stored model node whose file hash is ``sha256``, or None."""
        query = orm.QueryBuilder().append(cls, filters={'attributes.sha256': sha256}, project='*', tag='model')
        query.order_by({'model': {'ctime': 'asc'}}).limit(1)
        return query.first(flat=True)

    @classmethod
    def get_or_create(cls, filepath: str | os.PathLike) -> EqmlModelData:
        """The stored node holding a file identical to ``filepath`` if there is one, else a new stored node."""
        existing = cls.find_by_sha256(file_sha256(filepath))
        if existing is not None:
            return existing
        return cls(filepath=filepath).store()

    @classmethod
    def from_bytes(cls, content: bytes) -> EqmlModelData:
        """An unstored node from the bytes of a model file (validated like a file)."""
        with tempfile.TemporaryDirectory(prefix='eqml-model-') as scratch:
            path = os.path.join(scratch, FILENAME)
            with open(path, 'wb') as handle:
                handle.write(content)
            return cls(filepath=path)

    def __repr__(self) -> str:
        state = f'pk={self.pk}' if self.is_stored else 'unstored'
        return (
            f'<EqmlModelData {state}: {self.architecture}, species={self.species}, targets={self.targets}, '
            f'sha256={self.sha256[:12]}>'
        )


def load_model_node(identifier) -> EqmlModelData:
    """``orm.load_node`` that insists on an ``eqml.model`` node (clear error otherwise)."""
    try:
        node = orm.load_node(identifier)
    except NotExistent as exception:
        raise ValueError(f'no node with identifier {identifier!r}') from exception
    if not isinstance(node, EqmlModelData):
        raise ValueError(f'node {identifier!r} is a {type(node).__name__}, not an eqml.model')
    return node


__all__ += ('ModelFileError',)
