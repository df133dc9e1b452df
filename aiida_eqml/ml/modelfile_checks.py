"""Checks of a model file's payload (used by :mod:`aiida_eqml.ml.modelfile`): every fault a ``ModelFileError``.

Fields are type-checked before use (an integer ``params`` must not become ``bytes(10**9)``), the checksum of the
format version is verified (version 2: one sha256 over config, weights and metadata; version 1: the weights'
sha256 and ``metadata.content_sha256`` over config + weights), the config against the model schema, and the
weights against the layers the config builds.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from aiida_eqml.ml.modelfile import ModelFileError, _content_sha256_of_blob, payload_sha256

__all__ = ["check_payload", "restore_params", "build_checked_model"]

_FIELD_TYPES = {
    1: {"config": str, "metadata": str, "params": bytes, "params_sha256": str},
    2: {"config": str, "metadata": str, "params": bytes, "sha256": str, "package_version": str},
}
_SHA_FAILED = "fail their sha256 check"


def _json_object(path: str, field: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{path}: corrupt model file, {field} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise ModelFileError(f"{path}: corrupt model file, {field} is a JSON {kind}, expected an object")
    return value


def check_payload(path: str, payload: dict) -> tuple[dict, dict]:
    """``(config, metadata)`` of a payload whose fields have the right types and pass their checksums."""
    version = payload["format_version"]
    for field, kind in _FIELD_TYPES[version].items():
        if field not in payload:
            raise ModelFileError(f"{path}: corrupt model file, entry {field!r} missing")
        if not isinstance(payload[field], kind):
            raise ModelFileError(
                f"{path}: corrupt model file, entry {field!r} is a {type(payload[field]).__name__}, "
                f"expected {kind.__name__}"
            )
    blob = payload["params"]
    if version == 2:
        expected = payload_sha256(2, payload["package_version"], payload["config"], payload["metadata"], blob)
        if expected != payload["sha256"]:
            raise ModelFileError(f"{path}: corrupt model file, config, weights and metadata {_SHA_FAILED}")
    elif hashlib.sha256(blob).hexdigest() != payload["params_sha256"]:
        raise ModelFileError(f"{path}: corrupt model file, the weights {_SHA_FAILED}")
    config = _json_object(path, "config", payload["config"])
    metadata = _json_object(path, "metadata", payload["metadata"])
    if metadata.get("content_sha256") != _content_sha256_of_blob(config, blob):
        # Version 1: the only check over the config; version 2: a file whose stored summary hash lies.
        raise ModelFileError(f"{path}: corrupt model file, config and weights {_SHA_FAILED} (metadata.content_sha256)")
    return config, metadata


def _check_leaves(path: str, tree, where: str = "params") -> None:
    if isinstance(tree, dict):
        if not tree:
            raise ModelFileError(f"{path}: corrupt model file, {where} is an empty group")
        for key, value in tree.items():
            if not isinstance(key, str):
                raise ModelFileError(f"{path}: corrupt model file, {where} has a non-string key {key!r}")
            _check_leaves(path, value, f"{where}/{key}")
        return
    if not isinstance(tree, np.ndarray) or tree.dtype.kind != "f":
        kind = tree.dtype if isinstance(tree, np.ndarray) else type(tree).__name__
        raise ModelFileError(f"{path}: corrupt model file, weight {where} is {kind}, expected a float array")


def restore_params(path: str, blob: bytes) -> dict:
    """The flax params tree of the inner blob (arrays are views of ``blob``: nothing bigger is allocated)."""
    from flax import serialization

    try:
        params = serialization.msgpack_restore(blob)
    except Exception as exc:  # noqa: BLE001 - msgpack / numpy raise many types on crafted input
        raise ModelFileError(f"{path}: corrupt model file, weights unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(params, dict) or not isinstance(params.get("params"), dict):
        raise ModelFileError(f"{path}: corrupt model file, weights are not a flax params tree {{'params': {{...}}}}")
    _check_leaves(path, params)
    return params


def _expected_modules(model) -> set[str]:
    """Top-level flax modules the network creates for this config (see ``models.EquivariantNetwork``): the
    embedding, the heads, the output field and magnetic couplings, and those of the architecture's trunk (its
    registry entry)."""
    from aiida_eqml.ml.architectures import get_architecture

    cfg = model.config
    names = {"embedding"} | get_architecture(cfg["architecture"]).modules(cfg)
    names |= {f"head_{name}" for name, head in model.heads.items() if head.route == "direct"}
    if cfg["field"]:
        names.add("field_out")
    if cfg.get("magnetic", False):
        names.add("magnetic_out")
    return names


def build_checked_model(path: str, config: dict, params: dict):
    """``build_model(config)`` after the schema check, with weights for exactly the modules it has."""
    from aiida_eqml.ml.config_schema import validate_model_config
    from aiida_eqml.ml.models import build_model

    try:
        validate_model_config(config, "config")
        model = build_model(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: the stored model config is invalid: {exc}") from exc
    found, expected = set(params["params"]), _expected_modules(model)
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ModelFileError(
            f"{path}: the weights do not fit the config (num_layers {config.get('num_layers')}, heads "
            f"{sorted(model.heads)}): modules missing {missing}, unexpected {extra}"
        )
    dtype = np.dtype(model.config["dtype"])
    for leaf_path, leaf in _leaves(params):
        if leaf.dtype != dtype:
            raise ModelFileError(f"{path}: weight {leaf_path} is {leaf.dtype}, the config says {dtype}")
    return model


def _leaves(tree, where="params"):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{where}/{key}")
    else:
        yield where, tree
