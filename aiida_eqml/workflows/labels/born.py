"""``eqml.labels.born``: Born effective charges Z* and eps_inf from ph.x (electric field at Gamma only).

Per structure: a pw.x scf with fixed occupations (``PwBaseWorkChain``), then ph.x on its ground state with
``epsil=.true.`` and ``trans=.false.`` (``PhBaseWorkChain``): the three electric-field perturbations give eps_inf
and Z* without computing any phonon, which is the cheap part of DFPT that these labels need.
"""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain
from aiida.plugins import WorkflowFactory
from aiida_quantumespresso.common.types import ElectronicType

from aiida_eqml.calculations.functions.harvest import harvest_born_labels
from aiida_eqml.workflows.labels import LabelsWorkChain, protocol_alias, protocol_filepath, structures_to_namespace
from aiida_eqml.workflows.labels.energies import build_pw_base_template, pw_inputs_for_structure

PwBaseWorkChain = WorkflowFactory('quantumespresso.pw.base')
PhBaseWorkChain = WorkflowFactory('quantumespresso.ph.base')

__all__ = ('BornLabelsWorkChain', 'BornScfPhWorkChain', 'gamma_qpoints')

_SCF_EXCLUDE = ('clean_workdir', 'pw.structure')
_PH_EXCLUDE = ('clean_workdir', 'ph.parent_folder', 'qpoints', 'qpoints_distance', 'qpoints_force_parity')


def gamma_qpoints(structure: orm.StructureData) -> orm.KpointsData:
    """Gamma as an explicit one-point list: the electric-field perturbation is a q -> 0 response.

    Not a 1x1x1 mesh: for a mesh PhCalculation sets ``ldisp=.true.``, and ph.x then forces ``trans=.true.``
    and computes the phonons at Gamma as well (seen on QE 7.2: three times the cost of the field part).
    """
    qpoints = orm.KpointsData()
    qpoints.set_cell_from_structure(structure)
    qpoints.set_kpoints([[0.0, 0.0, 0.0]])
    return qpoints


def ph_parameter_problem(parameters: dict) -> str | None:
    """Why ph.x parameters would not give Born charges and eps_inf only, or None."""
    inputph = {key.lower(): value for key, value in parameters.get('INPUTPH', {}).items()}
    if not inputph.get('epsil', False):
        return 'ph.x must run with INPUTPH.epsil=.true. (the electric-field perturbation)'
    if inputph.get('trans', True):
        return 'ph.x must run with INPUTPH.trans=.false. (no phonons are needed for Z* and eps_inf)'
    return None


def scf_parameter_problem(parameters: dict) -> str | None:
    """Why pw.x parameters cannot precede an electric-field ph.x run, or None."""
    occupations = parameters.get('SYSTEM', {}).get('occupations', 'fixed')
    if occupations != 'fixed':
        return (
            f"Z* and eps_inf from DFPT need an insulator with SYSTEM.occupations='fixed' in the scf, got "
            f'{occupations!r}'
        )
    return None


class BornScfPhWorkChain(WorkChain):
    """pw.x scf then ph.x (epsil only, at Gamma) for one structure; outputs the ph.x ``output_parameters``."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData)
        spec.expose_inputs(PwBaseWorkChain, namespace='scf', exclude=_SCF_EXCLUDE)
        spec.expose_inputs(PhBaseWorkChain, namespace='ph', exclude=_PH_EXCLUDE)
        spec.input('clean_workdir', valid_type=orm.Bool, default=lambda: orm.Bool(False))
        spec.outline(cls.run_scf, cls.inspect_scf, cls.run_ph, cls.inspect_ph, cls.results)
        spec.output('scf_parameters', valid_type=orm.Dict, help='output_parameters of the pw.x scf')
        spec.output('ph_parameters', valid_type=orm.Dict, help='output_parameters of ph.x: Z* and eps_inf')
        spec.exit_code(401, 'ERROR_SUB_PROCESS_FAILED_SCF', message='The pw.x scf PwBaseWorkChain failed.')
        spec.exit_code(402, 'ERROR_SUB_PROCESS_FAILED_PH', message='The ph.x PhBaseWorkChain failed.')
        spec.exit_code(403, 'ERROR_NO_BORN_CHARGES', message='ph.x finished but gave no {missing}.')

    def run_scf(self):
        inputs = AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace='scf'))
        inputs.pw.structure = self.inputs.structure
        inputs.metadata.call_link_label = 'scf'
        return ToContext(scf=self.submit(PwBaseWorkChain, **inputs))

    def inspect_scf(self):
        if not self.ctx.scf.is_finished_ok:
            self.report(f'scf PwBaseWorkChain<{self.ctx.scf.pk}> failed with exit status {self.ctx.scf.exit_status}')
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_SCF

    def run_ph(self):
        inputs = AttributeDict(self.exposed_inputs(PhBaseWorkChain, namespace='ph'))
        inputs.ph.parent_folder = self.ctx.scf.outputs.remote_folder
        inputs.qpoints = gamma_qpoints(self.inputs.structure)
        inputs.metadata.call_link_label = 'ph'
        return ToContext(ph=self.submit(PhBaseWorkChain, **inputs))

    def inspect_ph(self):
        if not self.ctx.ph.is_finished_ok:
            self.report(f'PhBaseWorkChain<{self.ctx.ph.pk}> failed with exit status {self.ctx.ph.exit_status}')
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_PH
        output = self.ctx.ph.outputs.output_parameters.get_dict()
        missing = [key for key in ('dielectric_constant', 'effective_charges_eu') if key not in output]
        if missing:
            return self.exit_codes.ERROR_NO_BORN_CHARGES.format(missing=', '.join(missing))

    def results(self):
        self.out('scf_parameters', self.ctx.scf.outputs.output_parameters)
        self.out('ph_parameters', self.ctx.ph.outputs.output_parameters)
        if self.inputs.clean_workdir.value:
            for calc in self.node.called_descendants:
                if isinstance(calc, orm.CalcJobNode) and 'remote_folder' in calc.outputs:
                    try:
                        calc.outputs.remote_folder._clean()
                    except (OSError, KeyError):
                        pass


class BornLabelsWorkChain(LabelsWorkChain):
    """Z* and eps_inf of every structure (e.g. rattled cells of an insulator) harvested into an ``eqml.dataset``.

    ``scf.pw.pseudos`` is keyed by element (each structure's kinds are mapped onto it).
    """

    _item_class = BornScfPhWorkChain

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(
            PwBaseWorkChain,
            namespace='scf',
            exclude=_SCF_EXCLUDE,
            namespace_options={'help': 'Inputs of the pw.x scf of every structure (pseudos by element).'},
        )
        spec.expose_inputs(PhBaseWorkChain, namespace='ph', exclude=_PH_EXCLUDE,
                           namespace_options={'help': 'Inputs of ph.x (epsil=.true., trans=.false.; q = Gamma).'})
        spec.input('clean_workdir', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Clean the remote folders of each structure once its ph.x has finished.')

    @classmethod
    def get_protocol_filepath(cls):
        return protocol_filepath('born')

    @classmethod
    def get_builder_from_protocol(
        cls, pw_code, ph_code, structures, protocol=None, overrides=None, options=None, pseudo_family=None,
        stringency=None, **kwargs,
    ):
        """Builder for a list / dict / group of (insulating) structures.

        :param pw_code: the ``quantumespresso.pw`` code; :param ph_code: the ``quantumespresso.ph`` code.
        :param structures: list, dict (keys become link labels) or ``orm.Group`` of ``StructureData``.
        :param protocol: ``fast``, ``moderate`` (default) or ``precise``.
        :param overrides: nested dict over the protocol inputs; ``scf`` goes to
            ``PwBaseWorkChain.get_builder_from_protocol`` and ``ph`` to ``PhBaseWorkChain.get_builder_from_protocol``.
        :param options: ``metadata.options`` of every pw.x and ph.x calculation.
        :param pseudo_family, stringency: instead of the pseudo family / cutoffs of ``aiida-eqml local setup``.
        """
        from aiida_eqml.workflows.protocols import protocol_overrides

        inputs = cls.get_protocol_inputs(protocol, overrides)
        structures = structures_to_namespace(structures)
        kwargs.setdefault('electronic_type', ElectronicType.INSULATOR)
        builder = cls.get_builder()
        builder.structures = structures
        builder.scf = build_pw_base_template(
            pw_code, structures, protocol, overrides=inputs.get('scf'), pseudo_family=pseudo_family,
            stringency=stringency, options=options, **kwargs,
        )
        ph_overrides = protocol_overrides(PhBaseWorkChain, ph_code, overrides=inputs.get('ph'))
        ph = PhBaseWorkChain.get_builder_from_protocol(
            ph_code, protocol=protocol_alias(protocol), overrides=ph_overrides,
            electronic_type=ElectronicType.INSULATOR, options=options,
        )._inputs(prune=True)
        for key in ('clean_workdir', 'qpoints', 'qpoints_distance', 'qpoints_force_parity'):
            ph.pop(key, None)
        builder.ph = ph
        builder.max_concurrent = orm.Int(inputs['max_concurrent'])
        builder.allow_failures = orm.Bool(inputs['allow_failures'])
        builder.clean_workdir = orm.Bool(inputs['clean_workdir'])
        return builder

    def validate_parameters(self):
        return scf_parameter_problem(self.inputs.scf.pw.parameters.get_dict()) or ph_parameter_problem(
            self.inputs.ph.ph.parameters.get_dict()
        )

    def validate_structure(self, key, structure):
        missing = sorted({kind.symbol for kind in structure.kinds} - set(self.inputs.scf.pw.pseudos))
        if missing:
            return f'no pseudopotential in `scf.pw.pseudos` for element(s) {missing}'

    def get_item_inputs(self, key, structure):
        scf = pw_inputs_for_structure(AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace='scf')), structure)
        ph = AttributeDict(self.exposed_inputs(PhBaseWorkChain, namespace='ph'))
        return {'structure': structure, 'scf': scf, 'ph': ph, 'clean_workdir': self.inputs.clean_workdir}

    def harvest(self, keys):
        labels = {}
        for key in keys:
            labels[f'{key}_structure'] = self.inputs.structures[key]
            labels[f'{key}_parameters'] = self.item_node(key).outputs.ph_parameters
        return harvest_born_labels(**labels, metadata={'call_link_label': 'harvest_born_labels'})
