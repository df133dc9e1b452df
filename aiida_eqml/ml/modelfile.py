"""One self-describing model file, saved and loaded without pickle.

Layout (binary)::

    b"AIIDA-EQML-MODEL\\n"                       magic line
    msgpack map (flax.serialization):
        format          "aiida-eqml-model"
        format_version  2
        package_version aiida_eqml.__version__ at save time
        config          JSON string: the ModelConfig (architecture, species, cutoff, heads,
                        normalisation) -> build_model(config) rebuilds the module
        metadata        JSON string: target specs, head irreps, metrics, provenance...
        params          msgpack bytes of the flax params tree (numpy arrays, exact dtypes)
        sha256          hex digest over format version, package version, config, metadata and
                        params (:func:`payload_sha256`), verified on every load

The params travel as an inner msgpack blob so that the checksum is computed over exactly the
bytes that are restored; a flipped bit anywhere in config, weights or metadata is caught before
use. Version 1 files (``params_sha256`` over the weights only) still load: their
``metadata.content_sha256`` (config + weights) is verified too, so only their metadata is
unprotected. Every malformed payload is a :class:`ModelFileError`; nothing is allocated beyond
what the file's bytes hold, and the config is checked against the model schema
(:mod:`aiida_eqml.ml.config_schema`) and the weights against the layers it implies.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "ModelFileError",
    "save_model",
    "load_model",
    "read_model_file",
    "file_sha256",
    "content_sha256",
    "payload_sha256",
]

MODEL_FORMAT = "aiida-eqml-model"
MODEL_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_MAGIC = b"AIIDA-EQML-MODEL\n"
#: bytes; a larger file is refused before it is read (``AIIDA_EQML_MAX_MODEL_BYTES`` overrides)
MAX_MODEL_BYTES = int(os.environ.get("AIIDA_EQML_MAX_MODEL_BYTES", 8 * 2**30))


class ModelFileError(ValueError):
    """The file is not a readable aiida-eqml model file (corrupt, truncated, wrong version)."""


def _params_to_numpy(params) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(x), _unfreeze(params))


def _unfreeze(tree):
    try:
        from flax.core import unfreeze

        return unfreeze(tree)
    except ImportError:  # pragma: no cover - flax is a dependency
        return tree


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _params_bytes(params) -> bytes:
    from flax import serialization

    return serialization.msgpack_serialize(_params_to_numpy(params))


def content_sha256(config: Mapping[str, Any], params) -> str:
    """Hash of what determines predictions (config + weights), independent of metadata."""
    return _content_sha256_of_blob(config, _params_bytes(params))


def _content_sha256_of_blob(config: Mapping[str, Any], params_blob: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(_canonical_json(config).encode())
    digest.update(params_blob)
    return digest.hexdigest()


def payload_sha256(
    format_version: int, package_version: str, config_json: str, metadata_json: str, params_blob: bytes
) -> str:
    """The one checksum of a version-2 file: every field, length-prefixed (no two payloads share their bytes)."""
    digest = hashlib.sha256(MODEL_FORMAT.encode())
    for part in (
        str(format_version).encode(),
        package_version.encode(),
        config_json.encode(),
        metadata_json.encode(),
        params_blob,
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    path: str | os.PathLike, config: Mapping[str, Any], params, metadata: Mapping[str, Any] | None = None
) -> str:
    """Write the model file atomically; returns its sha256.

    ``config`` must be JSON-serialisable (it is the ModelConfig); ``metadata`` too. The head
    irreps and the content hash are added to the stored metadata so a reader needs no code
    to know what the model predicts.
    """
    from flax import serialization

    import aiida_eqml

    try:
        config_json = json.dumps(config, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"model config is not JSON-serialisable: {exc}") from exc
    metadata = dict(metadata or {})
    heads = {}
    try:
        from aiida_eqml.ml.models import build_model

        model = build_model(json.loads(config_json))
        heads = {name: {"level": h.level, "irreps": str(h.irreps)} for name, h in model.heads.items()}
    except ImportError:  # pragma: no cover - models.py is part of the package
        pass
    metadata.setdefault("heads", heads)
    params_blob = _params_bytes(params)
    metadata["content_sha256"] = content_sha256(json.loads(config_json), params)
    try:
        metadata_json = json.dumps(metadata, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"model metadata is not JSON-serialisable: {exc}") from exc
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": aiida_eqml.__version__,
        "config": config_json,
        "metadata": metadata_json,
        "params": params_blob,
        "sha256": payload_sha256(MODEL_FORMAT_VERSION, aiida_eqml.__version__, config_json, metadata_json, params_blob),
    }
    data = _MAGIC + serialization.msgpack_serialize(payload)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # never leave a half-written model file under the final name
    return hashlib.sha256(data).hexdigest()


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """``(config, params as numpy tree, metadata)`` after all integrity checks; no model built."""
    from aiida_eqml.ml.modelfile_checks import check_payload, restore_params

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(
            f"{path}: {size} bytes, more than the {MAX_MODEL_BYTES} accepted (AIIDA_EQML_MAX_MODEL_BYTES)"
        )
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(_MAGIC):
        raise ModelFileError(f"{path}: not an aiida-eqml model file (bad magic header)")
    payload = _restore_payload(path, data[len(_MAGIC) :])
    config, metadata = check_payload(path, payload)
    params = restore_params(path, payload["params"])
    metadata["package_version_saved"] = payload.get("package_version")
    return config, params, metadata


def _restore_payload(path: str, data: bytes) -> dict:
    """The outer msgpack map; no ext hook, so nothing but plain msgpack values (bounded by ``data``) is built."""
    import msgpack

    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types on truncated or crafted input
        raise ModelFileError(f"{path}: corrupt or truncated model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not an aiida-eqml model file (format {found!r})")
    version = payload.get("format_version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise ModelFileError(
            f"{path}: model format version {version!r}, this aiida-eqml ({_package_version()}) "
            f"reads versions {list(_READABLE_VERSIONS)}"
        )
    return payload


def load_model(path: str | os.PathLike):
    """``(model, params, metadata)``: the flax module rebuilt from the stored config, the
    weights as jax arrays with their saved dtypes, and the metadata (incl. ``config``).

    A config that fails the model schema, or weights that do not fit the layers it builds, raise
    :class:`ModelFileError` too."""
    import jax
    import jax.numpy as jnp

    from aiida_eqml.ml.modelfile_checks import build_checked_model

    config, params, metadata = read_model_file(path)
    model = build_checked_model(os.fspath(path), config, params)
    metadata["config"] = config
    return model, jax.tree_util.tree_map(jnp.asarray, params), metadata


def _package_version() -> str:
    import aiida_eqml

    return aiida_eqml.__version__
