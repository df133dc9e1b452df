"""``eqml.labels.energies``: pw.x energies, forces and stresses for a set of structures."""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.plugins import WorkflowFactory

from aiida_eqml.calculations.functions.harvest import harvest_energy_labels
from aiida_eqml.workflows.labels import LabelsWorkChain, protocol_alias, protocol_filepath, structures_to_namespace

PwBaseWorkChain = WorkflowFactory('quantumespresso.pw.base')

__all__ = ('EnergyLabelsWorkChain', 'build_pw_base_template', 'pw_inputs_for_structure')


def build_pw_base_template(
    code, structures: dict, protocol=None, overrides=None, pseudo_family=None, stringency=None, **kwargs
) -> dict:
    """One ``PwBaseWorkChain`` input template valid for every structure of the set.

    ``PwBaseWorkChain.get_builder_from_protocol`` is asked for each structure, with the pseudo family and cutoffs
    of the configured stack injected by :func:`aiida_eqml.workflows.protocols.protocol_overrides` (``overrides``
    win). The template is the one of the largest structure (convergence thresholds scale with the number of
    atoms), with the largest cutoffs of the set (one basis for every sample) and the pseudos keyed by element.
    """
    from aiida_eqml.workflows.protocols import protocol_overrides

    builders = {}
    for key, structure in structures.items():
        merged = protocol_overrides(
            PwBaseWorkChain, code, structure, overrides=overrides, pseudo_family=pseudo_family, stringency=stringency
        )
        builders[key] = PwBaseWorkChain.get_builder_from_protocol(
            code, structure, protocol=protocol_alias(protocol), overrides=merged, **kwargs
        )
    largest = max(structures, key=lambda key: len(structures[key].sites))
    template = builders[largest]._inputs(prune=True)
    parameters = template['pw']['parameters'].get_dict()
    for cutoff in ('ecutwfc', 'ecutrho'):
        parameters['SYSTEM'][cutoff] = max(b.pw.parameters['SYSTEM'][cutoff] for b in builders.values())
    template['pw']['parameters'] = orm.Dict(parameters)
    pseudos = {}
    for key, builder in builders.items():
        for kind in structures[key].kinds:
            pseudos.setdefault(kind.symbol, builder.pw.pseudos[kind.name])
    template['pw']['pseudos'] = pseudos
    template['pw'].pop('structure', None)
    template.pop('clean_workdir', None)
    return template


def pw_inputs_for_structure(template: AttributeDict, structure: orm.StructureData) -> AttributeDict:
    """The template with the structure set and the element-keyed pseudos re-keyed by its kind names."""
    inputs = AttributeDict(template)
    inputs.pw = AttributeDict(template.pw)
    element_pseudos = template.pw.pseudos
    inputs.pw.pseudos = {kind.name: element_pseudos[kind.symbol] for kind in structure.kinds}
    inputs.pw.structure = structure
    return inputs


class EnergyLabelsWorkChain(LabelsWorkChain):
    """Run a ``PwBaseWorkChain`` scf per structure; harvest energy, forces and stress into an ``eqml.dataset``.

    ``pw_base.pw.pseudos`` is keyed by **element** (each structure's kinds are mapped onto it), so one
    template serves structures with different kind names.
    """

    _item_class = PwBaseWorkChain

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(
            PwBaseWorkChain, namespace='pw_base', exclude=('pw.structure', 'clean_workdir'),
            namespace_options={'help': 'Inputs of the PwBaseWorkChain run for every structure (pseudos by element).'},
        )
        spec.input('clean_workdir', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Clean the remote folders of the pw.x runs when each finishes.')

    @classmethod
    def get_protocol_filepath(cls):
        return protocol_filepath('energies')

    @classmethod
    def get_builder_from_protocol(
        cls, code, structures, protocol=None, overrides=None, options=None, pseudo_family=None, stringency=None,
        **kwargs,
    ):
        """Builder for a list / dict / group of structures.

        :param code: the ``quantumespresso.pw`` code.
        :param structures: list, dict (keys become link labels) or ``orm.Group`` of ``StructureData``.
        :param protocol: ``fast``, ``moderate`` (default) or ``precise``.
        :param overrides: nested dict over the protocol inputs; ``pw_base`` is passed on to
            ``PwBaseWorkChain.get_builder_from_protocol`` (e.g. ``{'pw_base': {'pseudo_family': ...}}``).
        :param options: ``metadata.options`` of every pw.x calculation.
        :param pseudo_family: label or group of the pseudo family, instead of the one of ``aiida-eqml local setup``.
        :param stringency: cutoff stringency of that family, instead of the configured one.
        :param kwargs: passed to ``PwBaseWorkChain.get_builder_from_protocol`` (``electronic_type``, ``spin_type``...).
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)
        structures = structures_to_namespace(structures)
        builder = cls.get_builder()
        builder.structures = structures
        builder.pw_base = build_pw_base_template(
            code, structures, protocol, overrides=inputs.get('pw_base'), pseudo_family=pseudo_family,
            stringency=stringency, options=options, **kwargs,
        )
        builder.max_concurrent = orm.Int(inputs['max_concurrent'])
        builder.allow_failures = orm.Bool(inputs['allow_failures'])
        builder.clean_workdir = orm.Bool(inputs['clean_workdir'])
        return builder

    def validate_parameters(self):
        control = self.inputs.pw_base.pw.parameters.get_dict().get('CONTROL', {})
        if control.get('calculation', 'scf') != 'scf':
            return f"energy labels need CONTROL.calculation='scf', got {control['calculation']!r}"
        if not (control.get('tprnfor') and control.get('tstress')):
            return 'energy labels need forces and stress: set CONTROL.tprnfor and CONTROL.tstress to True'

    def validate_structure(self, key, structure):
        missing = sorted({kind.symbol for kind in structure.kinds} - set(self.inputs.pw_base.pw.pseudos))
        if missing:
            return f'no pseudopotential in `pw_base.pw.pseudos` for element(s) {missing}'

    def get_item_inputs(self, key, structure):
        template = AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace='pw_base'))
        inputs = pw_inputs_for_structure(template, structure)
        inputs.clean_workdir = self.inputs.clean_workdir
        return inputs

    def harvest(self, keys):
        labels = {}
        for key in keys:
            node = self.item_node(key)
            labels[f'{key}_structure'] = self.inputs.structures[key]
            labels[f'{key}_parameters'] = node.outputs.output_parameters
            labels[f'{key}_trajectory'] = node.outputs.output_trajectory
        return harvest_energy_labels(**labels, metadata={'call_link_label': 'harvest_energy_labels'})
