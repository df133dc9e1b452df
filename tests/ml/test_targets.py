"""The target registry is the one definition of names, levels, formulas and units that the rest reads."""

import pytest

from aiida_eqml.ml import targets
from aiida_eqml.ml.targets import FIELD_QUANTITIES, RESPONSE_QUANTITIES, TARGETS, target_spec, target_specs


def test_every_target_is_well_formed_and_documented():
    from aiida_eqml.ml.models import LEVELS
    from aiida_eqml.ml.tensors import tensor_type

    for name, t in TARGETS.items():
        assert t.level in LEVELS, name
        assert (t.tensor is None) != (t.irreps is None), name
        if t.tensor is not None:
            tensor_type(t.tensor)  # parses
        assert f"``{name}``" in targets.__doc__, f"{name} missing from the table in aiida_eqml/ml/targets.py"
        assert t.quantity is None or t.quantity in RESPONSE_QUANTITIES


def test_response_and_models_read_the_registry():
    from aiida_eqml.ml import response
    from aiida_eqml.ml.models import build_model
    from aiida_eqml.ml.tensors import tensor_type

    assert response.QUANTITIES is RESPONSE_QUANTITIES and response.FIELD_QUANTITIES is FIELD_QUANTITIES
    heads = {q: {"route": "derivative"} for q in RESPONSE_QUANTITIES}
    model = build_model({"species": ["Ti", "O"], "heads": heads, "magnetic": True})  # nmr_shielding needs B, mu
    for q, (level, formula) in RESPONSE_QUANTITIES.items():
        assert model.heads[q].level == level and model.heads[q].irreps == tensor_type(formula).irreps
    assert model.config["field"]  # field quantities switch the field input on


def test_loaders_and_harvesters_share_the_specs():
    from aiida_eqml.ml.datasets.bto import BTO_TARGET_SPECS
    from aiida_eqml.ml.hubbard.records import HUBBARD_TARGET_SPECS

    assert BTO_TARGET_SPECS == target_specs("born_charges", "raman_tensors", "dielectric")
    assert HUBBARD_TARGET_SPECS == target_specs("hubbard_u", "hubbard_v")
    assert target_spec("forces") == {"level": "node", "tensor": "i", "unit": "eV/Angstrom"}
    assert target_spec("hubbard_v") == {"level": "edge", "irreps": "0e", "unit": "eV"}
    with pytest.raises(KeyError, match="unknown target 'bogus'"):
        target_spec("bogus")
