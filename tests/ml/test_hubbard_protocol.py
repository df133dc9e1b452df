"""The Hubbard label protocols (aiida_eqml.ml.hubbard.protocol): what tells two protocols apart, and what a record of
two protocols does. Pure Python: no DFT."""
from __future__ import annotations

import json

import pytest

from aiida_eqml.ml.hubbard.protocol import (
    CAMPAIGN_PROTOCOLS,
    LABEL_DEFINING_FIELDS,
    REFERENCE_PROTOCOL,
    REFERENCE_PROTOCOL_Q222,
    REFERENCE_PROTOCOL_Q333,
    protocol_differences,
    protocol_fingerprint,
    record_protocol,
)


class _Sample:
    def __init__(self, protocol):
        self.info = {'protocol': protocol}


class _Record:
    def __init__(self, *protocols):
        self.samples = [_Sample(p) for p in protocols]


def test_the_q222_protocol_differs_from_the_shipped_one_in_the_q_mesh_alone():
    assert REFERENCE_PROTOCOL['hp_qpoints'] == [1, 1, 1] and REFERENCE_PROTOCOL_Q222['hp_qpoints'] == [2, 2, 2]
    assert protocol_differences(REFERENCE_PROTOCOL, REFERENCE_PROTOCOL_Q222) == [
        'hp_qpoints: model [1, 1, 1], run [2, 2, 2]'
    ]
    assert protocol_fingerprint(REFERENCE_PROTOCOL) != protocol_fingerprint(REFERENCE_PROTOCOL_Q222)
    assert REFERENCE_PROTOCOL['name'] != REFERENCE_PROTOCOL_Q222['name']
    assert CAMPAIGN_PROTOCOLS == {'gamma': REFERENCE_PROTOCOL, 'q222': REFERENCE_PROTOCOL_Q222,
                                  'q333': REFERENCE_PROTOCOL_Q333}
    assert protocol_differences(REFERENCE_PROTOCOL_Q222, REFERENCE_PROTOCOL_Q333) == [
        'hp_qpoints: model [2, 2, 2], run [3, 3, 3]'
    ]
    assert len({protocol_fingerprint(p) for p in CAMPAIGN_PROTOCOLS.values()}) == 3


def test_a_protocol_read_back_from_json_is_the_same_protocol():
    back = json.loads(json.dumps(REFERENCE_PROTOCOL_Q222))
    assert protocol_differences(REFERENCE_PROTOCOL_Q222, back) == []
    assert protocol_fingerprint(back) == protocol_fingerprint(REFERENCE_PROTOCOL_Q222)
    # names and tolerances do not define labels; every defining field does
    assert protocol_fingerprint({**back, 'name': 'x', 'tolerance_onsite_ev': 1.0}) == protocol_fingerprint(back)
    for field in LABEL_DEFINING_FIELDS:
        changed = {**back, field: 'other'}
        assert protocol_fingerprint(changed) != protocol_fingerprint(back), field


def test_labels_of_the_two_campaigns_are_never_trained_on_together():
    assert record_protocol(_Record(REFERENCE_PROTOCOL_Q222, dict(REFERENCE_PROTOCOL_Q222)))['name'] == (
        'eqml-hubbard-reference-v2-q222')
    with pytest.raises(ValueError, match=r'different DFT protocols.*hp_qpoints: model \[1, 1, 1\], run \[2, 2, 2\]'):
        record_protocol(_Record(REFERENCE_PROTOCOL, REFERENCE_PROTOCOL_Q222))
