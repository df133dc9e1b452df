"""``eqml.dataset``: an :class:`aiida_eqml.ml.dataset.Dataset` stored as one ``.npz`` in a node's repository.

The file is exactly what :meth:`Dataset.save` writes (no pickle); the node adds queryable attributes
(schema version, counts, target names/levels/specs, species) and a content hash, so that::

    QueryBuilder().append(EqmlDatasetData, filters={'attributes.n_samples': {'>': 100}})

finds datasets, and :meth:`EqmlDatasetData.get_or_create` returns an already stored node holding the
same content instead of storing a duplicate.

The hash is over the arrays inside the file (names, dtypes, shapes, bytes), not over the zip bytes:
``numpy.savez`` stamps every zip member with the current time, so saving the same dataset twice gives
different files with identical content.
"""
from __future__ import annotations

import os
import tempfile

from aiida import orm
from aiida.common.exceptions import NotExistent

from aiida_eqml.ml.dataset import DATASET_FORMAT, DATASET_SCHEMA_VERSION, Dataset
from aiida_eqml.ml.dataset_file import DatasetError, dataset_sha256

__all__ = ('EqmlDatasetData', 'DatasetError', 'dataset_content_sha256')

FILENAME = 'dataset.npz'


def dataset_content_sha256(path: str | os.PathLike) -> str:
    """sha256 over the arrays of a dataset ``.npz`` (sorted by name): name, dtype, shape and raw bytes.

    Only the members a dataset has are read and hashed (:func:`aiida_eqml.ml.dataset_file.dataset_sha256`): a stray
    member neither costs memory nor changes the hash; a malformed file raises ``DatasetError``.
    """
    return dataset_sha256(path)


def _chemical_symbols(numbers: list[int]) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[z] for z in numbers]


class EqmlDatasetData(orm.Data):
    """A training dataset (structures + per-node / per-edge / global labels) in one compact file.

    Construct from an in-memory :class:`Dataset` (``EqmlDatasetData(dataset)``) or from a file written by
    :meth:`Dataset.save` (``EqmlDatasetData(filepath=...)``); the file is validated by loading it.
    """

    def __init__(self, dataset: Dataset | None = None, *, filepath: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if (dataset is None) == (filepath is None):
            raise ValueError('give exactly one of `dataset` (an aiida_eqml.ml.dataset.Dataset) or `filepath`')
        if dataset is not None:
            if not isinstance(dataset, Dataset):
                raise TypeError(f'`dataset` must be an aiida_eqml.ml.dataset.Dataset, got {type(dataset).__name__}')
            with tempfile.TemporaryDirectory(prefix='eqml-dataset-') as scratch:
                path = os.path.join(scratch, FILENAME)
                dataset.save(path)
                self._set_file(path, dataset)
        else:
            # Loading validates the file (format, schema version, every member against the metadata, the samples)
            # before it enters the repository: a file that fails raises DatasetError and no node is made.
            self._set_file(filepath, Dataset.load(filepath))

    def _set_file(self, path, dataset: Dataset) -> None:
        self.base.repository.put_object_from_file(os.fspath(path), FILENAME)
        specs = dataset.target_specs
        numbers = dataset.atomic_numbers
        attributes = {
            'format': DATASET_FORMAT,
            'schema_version': DATASET_SCHEMA_VERSION,
            'filename': FILENAME,
            'n_samples': len(dataset),
            'n_atoms': int(sum(sample.n_atoms for sample in dataset.samples)),
            'target_names': sorted(specs),
            'target_levels': {name: spec['level'] for name, spec in specs.items()},
            'target_specs': specs,
            'atomic_numbers': numbers,
            'species': _chemical_symbols(numbers),
            'sha256': dataset_content_sha256(path),
        }
        for key, value in attributes.items():
            self.base.attributes.set(key, value)

    # ---------------------------------------------------------------- queryable summary
    @property
    def schema_version(self) -> int:
        return self.base.attributes.get('schema_version')

    @property
    def n_samples(self) -> int:
        return self.base.attributes.get('n_samples')

    @property
    def n_atoms(self) -> int:
        """Total number of atoms over all samples."""
        return self.base.attributes.get('n_atoms')

    @property
    def target_names(self) -> list[str]:
        return self.base.attributes.get('target_names')

    @property
    def target_specs(self) -> dict:
        return self.base.attributes.get('target_specs')

    @property
    def species(self) -> list[str]:
        return self.base.attributes.get('species')

    @property
    def sha256(self) -> str:
        return self.base.attributes.get('sha256')

    @property
    def filename(self) -> str:
        return self.base.attributes.get('filename')

    # ---------------------------------------------------------------- content
    def get_dataset(self, validate: bool = True) -> Dataset:
        """Load the stored file back into a :class:`Dataset`."""
        with self.base.repository.as_path(self.filename) as path:
            return Dataset.load(path, validate=validate)

    def export_extxyz(self, path: str | os.PathLike) -> None:
        """Write all samples as extended XYZ (node/graph labels as per-atom arrays / info; see
        ``Dataset.to_extxyz``)."""
        self.get_dataset(validate=False).to_extxyz(path)

    def export_npz(self, path: str | os.PathLike) -> None:
        """Copy the stored ``.npz`` out of the repository."""
        with open(os.fspath(path), 'wb') as handle:
            handle.write(self.base.repository.get_object_content(self.filename, mode='rb'))

    # ---------------------------------------------------------------- deduplication
    @classmethod
    def find_by_sha256(cls, sha256: str) -> EqmlDatasetData | None:
        """The oldest stored dataset node whose content hash is ``sha256``, or None."""
        query = orm.QueryBuilder().append(cls, filters={'attributes.sha256': sha256}, project='*', tag='dataset')
        query.order_by({'dataset': {'ctime': 'asc'}}).limit(1)
        found = query.first(flat=True)
        return found

    @classmethod
    def get_or_create(cls, dataset: Dataset) -> EqmlDatasetData:
        """Return the stored node with the same content as ``dataset`` if there is one, else store a new one."""
        with tempfile.TemporaryDirectory(prefix='eqml-dataset-') as scratch:
            path = os.path.join(scratch, FILENAME)
            dataset.save(path)
            # Query before creating the node: an unstored node in the session makes SQLAlchemy autoflush warn.
            existing = cls.find_by_sha256(dataset_content_sha256(path))
            if existing is not None:
                return existing
            return cls(filepath=path).store()

    def __repr__(self) -> str:
        state = f'pk={self.pk}' if self.is_stored else 'unstored'
        return (
            f'<EqmlDatasetData {state}: {self.n_samples} samples, {self.n_atoms} atoms, '
            f'targets={self.target_names}, species={self.species}>'
        )


def load_dataset_node(identifier) -> EqmlDatasetData:
    """``orm.load_node`` that insists on an ``eqml.dataset`` node (clear error otherwise)."""
    try:
        node = orm.load_node(identifier)
    except NotExistent as exception:
        raise ValueError(f'no node with identifier {identifier!r}') from exception
    if not isinstance(node, EqmlDatasetData):
        raise ValueError(f'node {identifier!r} is a {type(node).__name__}, not an eqml.dataset')
    return node
