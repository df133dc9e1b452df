"""The Hubbard entry of the trainer's extension point (:mod:`aiida_eqml.ml.preparation`).

A Hubbard record (U / V labels with the raw occupation matrices of each scf) becomes the descriptor dataset and a
complete U / V model config (:func:`aiida_eqml.ml.hubbard.training.prepare_hubbard_training`); the descriptor slots
and the DFT protocol of the labels go into the model file's metadata (``"hubbard"``, ``"protocol"``), where
prediction and the ML loop read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiida_eqml.ml.preparation import Prepared

__all__ = ["prepare_hubbard_dataset"]


def prepare_hubbard_dataset(dataset, config: dict, parent_metadata: Mapping[str, Any] | None) -> Prepared | None:
    """``Prepared`` for a Hubbard record, ``None`` for any other dataset."""
    from aiida_eqml.ml.hubbard.protocol import record_protocol
    from aiida_eqml.ml.hubbard.training import is_hubbard_record, prepare_hubbard_training

    if not is_hubbard_record(dataset):
        return None
    protocol = record_protocol(dataset)  # the DFT settings of the labels: the ML loop checks them
    dataset, config, slots = prepare_hubbard_training(dataset, config, parent_metadata)
    metadata: dict[str, Any] = {"hubbard": slots}
    if protocol is not None:
        metadata["protocol"] = protocol
    return Prepared(dataset, config, metadata)
