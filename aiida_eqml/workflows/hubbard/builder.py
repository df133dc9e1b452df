"""``get_builder_from_protocol`` of ``eqml.hubbard.self_consistent``: protocol YAML < models' protocol < overrides.

The YAML (aiida-hubbard's names ``fast`` / ``balanced`` / ``stringent``) sets tolerances and loop options; the
models' training protocol (``metadata['protocol']`` of the model file) then sets the DFT settings that change U/V,
so a loop built here runs where its models were trained; the caller's ``overrides`` win over both (and a mismatch
they introduce is refused by the input validation, with the field named).
"""
from __future__ import annotations

import copy

from aiida import orm

__all__ = ('builder_from_protocol', 'models_namespace', 'models_protocol')


def models_namespace(models) -> dict:
    """``{link label: EqmlModelData}`` from one model, a list (ensemble members) or a dict."""
    from aiida_eqml.data.model import EqmlModelData

    if isinstance(models, EqmlModelData):
        return {'model': models}
    if isinstance(models, dict):
        return dict(models)
    return {f'member_{index:02d}': model for index, model in enumerate(models)}


def models_protocol(models: dict) -> dict | None:
    """The training protocol recorded in the first model (the input validation checks that all agree)."""
    first = models[sorted(models)[0]]
    return first.read()[2].get('protocol')


def _protocol_layer(trained: dict | None) -> dict:
    if not trained:
        return {}
    system = {key: trained[field] for key, field in (('ecutwfc', 'ecutwfc_ry'), ('ecutrho', 'ecutrho_ry'),
                                                     ('smearing', 'smearing'), ('degauss', 'degauss_ry'))
              if field in trained}
    scf = {'pw': {'parameters': {'SYSTEM': system}}}
    if 'kpoints_distance' in trained:
        scf.update({'kpoints_distance': trained['kpoints_distance'], 'kpoints_force_parity': False})
    return {'scf': scf}


def builder_from_protocol(cls, pw_code, hubbard_structure, models, protocol=None, hp_code=None, overrides=None,
                          options_pw=None, options_hp=None, **kwargs):
    from aiida_hubbard.workflows.hp.main import HpWorkChain
    from aiida_quantumespresso.workflows.protocols.utils import recursive_merge
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain
    from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

    from aiida_eqml.workflows.protocols import get_builder_from_protocol

    models = models_namespace(models)
    trained = models_protocol(models)
    inputs = cls.get_protocol_inputs(protocol)
    inputs = recursive_merge(inputs, _protocol_layer(trained))
    inputs = recursive_merge(inputs, copy.deepcopy(overrides or {}))

    builder = cls.get_builder()
    builder.hubbard_structure = hubbard_structure
    builder.models = models
    scf = get_builder_from_protocol(PwBaseWorkChain, pw_code, hubbard_structure, protocol=protocol,
                                    overrides=inputs.get('scf'), options=options_pw, **kwargs)
    scf.pop('clean_workdir', None)
    scf['pw'].pop('structure', None)
    builder.scf = scf
    if 'relax' in (overrides or {}):  # aiida-hubbard always adds one and users pop it; here it is asked for
        relax = get_builder_from_protocol(PwRelaxWorkChain, pw_code, hubbard_structure, protocol=protocol,
                                          overrides=inputs.get('relax'), options=options_pw, **kwargs)
        relax.pop('clean_workdir', None)
        relax.pop('structure', None)
        builder.relax = relax
    if hp_code is not None:
        hubbard = get_builder_from_protocol(HpWorkChain, hp_code, protocol=protocol, overrides=inputs.get('hubbard'),
                                            options=options_hp)
        hubbard.pop('clean_workdir', None)
        for name in ('parent_scf', 'hubbard_structure', 'parent_hp'):
            hubbard['hp'].pop(name, None)
        if trained and 'hp_qpoints' in trained and 'qpoints_distance' not in (overrides or {}).get('hubbard', {}):
            hubbard.pop('qpoints_distance', None)
            qpoints = orm.KpointsData()
            qpoints.set_kpoints_mesh(list(trained['hp_qpoints']))
            hubbard.qpoints = qpoints
        builder.hubbard = hubbard
        builder.uncertainty_threshold = orm.Float(inputs['uncertainty_threshold'])
        builder.validate_with_dfpt = orm.Bool(inputs['validate_with_dfpt'])
    builder.radial_analysis = orm.Dict(inputs['radial_analysis'])  # the V shell of hp.x and of the predictions
    for name, node_type in (('tolerance_onsite', orm.Float), ('tolerance_intersite', orm.Float),
                            ('max_iterations', orm.Int), ('meta_convergence', orm.Bool), ('clean_workdir', orm.Bool),
                            ('skip_relax_iterations', orm.Int), ('relax_frequency', orm.Int)):
        if name in inputs:
            builder[name] = node_type(inputs[name])
    return builder
