"""One self-describing model file, saved and loaded without pickle.

Layout (binary)::

    b"AIIDA-EQML-MODEL\\n"                       magic line
    msgpack map (flax.serialization):
        format          "aiida-eqml-model"
        format_version  1
        package_version aiida_eqml.__version__ at save time
        config          JSON string: the ModelConfig (architecture, species, cutoff, heads,
                        normalisation) -> build_model(config) rebuilds the module
        metadata        JSON string: target specs, head irreps, metrics, provenance...
        params          msgpack bytes of the flax params tree (numpy arrays, exact dtypes)
        params_sha256   hex digest of those bytes (detects corruption / truncation)

The params travel as an inner msgpack blob so that their checksum is computed over exactly the
bytes that are restored; a flipped bit anywhere in the weights is caught before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

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
]

MODEL_FORMAT = "aiida-eqml-model"
MODEL_FORMAT_VERSION = 1
_MAGIC = b"AIIDA-EQML-MODEL\n"


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
    digest = hashlib.sha256()
    digest.update(_canonical_json(config).encode())
    digest.update(_params_bytes(params))
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(path: str | os.PathLike, config: Mapping[str, Any], params, metadata: Mapping[str, Any] | None = None) -> str:
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
        "params_sha256": hashlib.sha256(params_blob).hexdigest(),
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
    from flax import serialization

    path = os.fspath(path)
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(_MAGIC):
        raise ModelFileError(f"{path}: not an aiida-eqml model file (bad magic header)")
    try:
        payload = serialization.msgpack_restore(data[len(_MAGIC) :])
    except Exception as exc:  # msgpack raises several types on truncated input
        raise ModelFileError(f"{path}: corrupt or truncated model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not an aiida-eqml model file (format {payload.get('format') if isinstance(payload, dict) else None!r})")
    version = payload.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version}, this aiida-eqml ({_package_version()}) reads version {MODEL_FORMAT_VERSION}"
        )
    for key in ("config", "metadata", "params", "params_sha256"):
        if key not in payload:
            raise ModelFileError(f"{path}: corrupt model file, entry {key!r} missing")
    blob = bytes(payload["params"])
    if hashlib.sha256(blob).hexdigest() != payload["params_sha256"]:
        raise ModelFileError(f"{path}: corrupt model file, the weights fail their sha256 check")
    try:
        params = serialization.msgpack_restore(blob)
        config = json.loads(payload["config"])
        metadata = json.loads(payload["metadata"])
    except Exception as exc:
        raise ModelFileError(f"{path}: corrupt model file ({type(exc).__name__}: {exc})") from exc
    metadata["package_version_saved"] = payload.get("package_version")
    return config, params, metadata


def load_model(path: str | os.PathLike):
    """``(model, params, metadata)``: the flax module rebuilt from the stored config, the
    weights as jax arrays with their saved dtypes, and the metadata (incl. ``config``)."""
    import jax
    import jax.numpy as jnp

    from aiida_eqml.ml.models import build_model

    config, params, metadata = read_model_file(path)
    model = build_model(config)
    metadata["config"] = config
    return model, jax.tree_util.tree_map(jnp.asarray, params), metadata


def _package_version() -> str:
    import aiida_eqml

    return aiida_eqml.__version__
