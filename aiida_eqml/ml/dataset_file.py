"""Reading a dataset ``.npz`` defensively: what :meth:`aiida_eqml.ml.dataset.Dataset.load` uses.

The file is a zip of ``.npy`` members (see ``Dataset.save``). :func:`read_dataset_arrays` reads
the JSON metadata first, derives from it the exact list of members a dataset has, and reads only
those; for each it parses the ``.npy`` header and checks dtype and shape against what the
metadata and the per-sample counts imply *before* numpy allocates the array, and bounds the
declared size by the zip entry (deflate cannot expand more than ~1032x) and by ``max_bytes``.
So a stray 2 GB member costs nothing, an 8 TB header is an error instead of a MemoryError, and
atoms or labels cannot shift between samples (``sum(n_atoms)`` vs the atom arrays, values vs
their ``present`` masks). Every failure is a :class:`DatasetError` naming file, field and value.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DatasetError",
    "GROUPS",
    "MAX_DATASET_BYTES",
    "read_dataset_arrays",
    "arrays_sha256",
    "dataset_sha256",
    "dataset_digest",
]

GROUPS = ("node_targets", "graph_targets", "edge_targets", "node_attrs", "edge_attrs")
SEP = "::"  # the member-name separator of Dataset.save
#: Upper bound of the decompressed arrays of one dataset file (bytes); ``AIIDA_EQML_MAX_DATASET_BYTES`` overrides.
MAX_DATASET_BYTES = int(os.environ.get("AIIDA_EQML_MAX_DATASET_BYTES", 16 * 2**30))
_MAX_METADATA_BYTES = 512 * 2**20
_DEFLATE_MAX_RATIO = 1100  # deflate's limit is ~1032:1; anything above is a forged zip entry
_KINDS = {"int": "iu", "float": "f", "bool": "b", "str": "U"}


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, the field and the value."""


class _Reader:
    def __init__(self, path: str, archive: zipfile.ZipFile, max_bytes: int):
        self.path, self.archive, self.budget = path, archive, max_bytes
        self.members = {info.filename: info for info in archive.infolist()}

    def fail(self, field: str, message: str):
        raise DatasetError(f"{self.path}: {field}: {message}")

    def read(self, name: str, kind: str, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
        """Member ``name``: its header checked (dtype kind, shape or ndim, size bound), then its data."""
        info = self.members.get(f"{name}.npy")
        if info is None:
            self.fail(name, "member missing from the file")
        dtype, declared = self._header(name, info)
        if dtype.kind not in _KINDS[kind] or dtype.hasobject:
            self.fail(name, f"dtype {dtype.str} where a {kind} array is expected")
        if shape is not None and tuple(declared) != tuple(shape):
            self.fail(name, f"shape {tuple(declared)}, expected {tuple(shape)} from the metadata and counts")
        if ndim is not None and len(declared) != ndim:
            self.fail(name, f"shape {tuple(declared)} has {len(declared)} axes, expected {ndim}")
        nbytes = int(np.prod(declared, dtype=object)) * dtype.itemsize
        limit = (
            info.file_size
            if info.compress_type == zipfile.ZIP_STORED
            else _DEFLATE_MAX_RATIO * info.compress_size + 4096
        )
        if nbytes > min(info.file_size, limit):
            self.fail(
                name, f"header declares {nbytes} bytes but the zip entry holds at most {min(info.file_size, limit)}"
            )
        if nbytes > self.budget:
            self.fail(
                name,
                f"header declares {nbytes} bytes, beyond the remaining limit of {self.budget} bytes "
                "(AIIDA_EQML_MAX_DATASET_BYTES)",
            )
        self.budget -= nbytes
        try:
            with self.archive.open(info) as handle:
                return np.lib.format.read_array(handle, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            self.fail(name, f"unreadable data ({type(exc).__name__}: {exc})")

    def _header(self, name: str, info) -> tuple[np.dtype, tuple]:
        try:
            with self.archive.open(info) as handle:
                version = np.lib.format.read_magic(handle)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }.get(version)
                if read_header is None:
                    raise ValueError(f".npy format version {version} (Dataset.save writes 1.0)")
                shape, fortran, dtype = read_header(handle)
        except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile) as exc:
            self.fail(name, f"not a valid .npy header ({type(exc).__name__}: {exc})")
        if fortran and len(shape) > 1:
            self.fail(name, "Fortran-ordered arrays are not written by Dataset.save")
        return dtype, tuple(shape)


def _metadata(reader: _Reader) -> tuple[dict, np.ndarray]:
    info = reader.members.get("metadata.npy")
    if info is None:
        reader.fail("metadata", "no 'metadata' entry; not an aiida-eqml dataset file")
    if info.file_size > _MAX_METADATA_BYTES:
        reader.fail("metadata", f"{info.file_size} bytes, more than the {_MAX_METADATA_BYTES} accepted")
    raw = reader.read("metadata", "str", shape=())
    try:
        metadata = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        reader.fail("metadata", f"not JSON ({exc})")
    if not isinstance(metadata, dict):
        reader.fail("metadata", f"a JSON {type(metadata).__name__}, expected an object")
    return metadata, raw


def _check_metadata(reader: _Reader, metadata: dict) -> None:
    from aiida_eqml.ml.dataset import DATASET_FORMAT, DATASET_SCHEMA_VERSION

    if metadata.get("format") != DATASET_FORMAT:
        reader.fail("metadata.format", f"{metadata.get('format')!r}, expected {DATASET_FORMAT!r}")
    if metadata.get("schema_version") != DATASET_SCHEMA_VERSION:
        reader.fail(
            "metadata.schema_version",
            f"dataset schema version {metadata.get('schema_version')!r}; "
            f"this code reads version {DATASET_SCHEMA_VERSION}",
        )
    specs, layout, info = metadata.get("target_specs"), metadata.get("layout"), metadata.get("info")
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        reader.fail("metadata.target_specs", f"{specs!r} is not an object of objects")
    if not isinstance(layout, dict) or set(layout) != set(GROUPS):
        reader.fail(
            "metadata.layout",
            f"groups {sorted(layout) if isinstance(layout, dict) else layout!r}, expected {sorted(GROUPS)}",
        )
    for group, names in layout.items():
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) and n.isidentifier() for n in names)
            or len(set(names)) != len(names)
        ):
            reader.fail(f"metadata.layout.{group}", f"{names!r} is not a list of distinct identifiers")
        if group.endswith("targets"):
            undeclared = sorted(set(names) - set(specs))
            if undeclared:
                reader.fail(
                    f"metadata.layout.{group}", f"targets {undeclared} have no entry in target_specs {sorted(specs)}"
                )
    if not isinstance(info, list) or not all(isinstance(i, dict) for i in info):
        reader.fail("metadata.info", "not a list of objects (one per sample)")


def _counts(reader: _Reader, name: str, shape: tuple) -> np.ndarray:
    counts = reader.read(name, "int", shape=shape).astype(np.int64)
    if np.any(counts < 0):
        reader.fail(name, f"negative counts {counts[counts < 0][:3].tolist()}")
    return counts


def _entry_shape(reader: _Reader, field: str, spec: Mapping[str, Any]) -> tuple:
    from aiida_eqml.ml.dataset import LEVELS, target_shape

    try:
        if spec.get("level") not in LEVELS:
            raise ValueError(f"level {spec.get('level')!r}, expected one of {LEVELS}")
        return target_shape(spec)
    except (ValueError, KeyError, TypeError) as exc:
        reader.fail(field, f"invalid target spec {dict(spec)!r} ({exc})")


def _read_group(reader: _Reader, arrays: dict, group: str, name: str, n_atoms: np.ndarray, specs: dict) -> None:
    key = f"{group}{SEP}{name}"
    n_samples = len(n_atoms)
    present = reader.read(f"{key}{SEP}present", "bool", shape=(n_samples,))
    arrays[f"{key}{SEP}present"] = present
    n_present = int(present.sum())
    entry = _entry_shape(reader, f"metadata.target_specs.{name}", specs[name]) if group.endswith("targets") else None
    values_name = f"{key}{SEP}values"
    if group.startswith("edge"):
        counts = _counts(reader, f"{key}{SEP}count", (n_present,))
        arrays[f"{key}{SEP}count"] = counts
        m = int(counts.sum())
        keys = reader.read(f"{key}{SEP}keys", "int", shape=(m, 5))
        arrays[f"{key}{SEP}keys"] = keys
        leading = (m,)
    elif group == "graph_targets":
        leading = (n_present,)
    else:
        leading = (int(n_atoms[present].sum()),)
    if entry is not None:
        values = reader.read(values_name, "float", shape=leading + tuple(entry))
    else:  # attributes: any per-entry shape, but one entry per atom / edge
        values = reader.read(values_name, "float", ndim=None)
        if values.shape[:1] != leading:
            reader.fail(
                values_name,
                f"shape {values.shape}, expected leading axis {leading[0]} from the present mask and counts",
            )
    arrays[values_name] = values


def read_dataset_arrays(path: str | os.PathLike, *, max_bytes: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """``(metadata, {member name: array})`` of a dataset file, every member checked against the metadata.

    Only the members a dataset of this metadata has are read (``metadata`` included, as its 0-d string array).
    """
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable aiida-eqml dataset file ({type(exc).__name__}: {exc})") from exc
    with archive:
        reader = _Reader(path, archive, MAX_DATASET_BYTES if max_bytes is None else int(max_bytes))
        metadata, raw = _metadata(reader)
        _check_metadata(reader, metadata)
        n_samples = len(metadata["info"])
        arrays: dict[str, np.ndarray] = {"metadata": raw}
        n_atoms = _counts(reader, "n_atoms", (n_samples,))
        total = int(n_atoms.sum())
        arrays["n_atoms"] = n_atoms
        arrays["numbers"] = reader.read("numbers", "int", shape=(total,))
        arrays["positions"] = reader.read("positions", "float", shape=(total, 3))
        arrays["cells"] = reader.read("cells", "float", shape=(n_samples, 3, 3))
        arrays["pbc"] = reader.read("pbc", "bool", shape=(n_samples, 3))
        for group in GROUPS:
            for name in metadata["layout"][group]:
                _read_group(reader, arrays, group, name, n_atoms, metadata["target_specs"])
    return metadata, arrays


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays (sorted by name): name, dtype, shape and raw bytes; string arrays by their UTF-8 text.

    The same digest ``EqmlDatasetData`` has always stored for files written by ``Dataset.save`` (whose members are
    exactly these arrays).
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(name.encode())
        digest.update(array.dtype.str.encode())
        digest.update(repr(array.shape).encode())
        if array.dtype.kind == "U":  # the JSON metadata string: hash its UTF-8 text, not numpy's UCS-4
            digest.update(str(array).encode())
        else:
            digest.update(array.tobytes())
    return digest.hexdigest()


def dataset_sha256(path: str | os.PathLike) -> str:
    """Content hash of a dataset file (its expected members only; see :func:`arrays_sha256`)."""
    return arrays_sha256(read_dataset_arrays(path)[1])


def dataset_digest(dataset) -> str:
    """sha256 of an in-memory :class:`~aiida_eqml.ml.dataset.Dataset`: specs, structures, labels and inputs, in order.

    What a training checkpoint records, so that resuming it on other data is refused.
    """
    digest = hashlib.sha256(json.dumps(dataset.target_specs, sort_keys=True).encode())

    def add(label: str, array) -> None:
        array = np.ascontiguousarray(array)
        digest.update(f"{label}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())

    for index, s in enumerate(dataset.samples):
        for label, array in (("numbers", s.numbers), ("positions", s.positions), ("cell", s.cell), ("pbc", s.pbc)):
            add(f"{index}.{label}", array)
        for group in GROUPS:
            for name, value in sorted(getattr(s, group).items()):
                if group.startswith("edge"):
                    add(f"{index}.{group}.{name}.keys", value.keys)
                    value = value.values
                add(f"{index}.{group}.{name}", value)
    return digest.hexdigest()
