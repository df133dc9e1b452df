"""``eqml.labels.hubbard``: self-consistent Hubbard U/V (aiida-hubbard) harvested iteration by iteration.

Per structure, aiida-hubbard's ``SelfConsistentHubbardWorkChain`` runs its (scf -> hp.x) cycle. Every hp.x
iteration is one sample: the inputs are the occupation matrices of the scf that hp.x perturbed (extracted
with ``aiida_eqml.calculations.functions.occupations.extract_occupations``, so they hang off that
PwCalculation) and the U/V that scf used; the targets are the U/V hp.x returned. A cycle that stops at
``max_iterations`` without converging (exit status 601) still gives valid labels for each iteration.

The scf calculations retrieve ``out/aiida.save/occup.txt`` (needed for the inter-site occupations of a
DFT+U+V run). Magnetic structures get ``nspin=2`` with the moments given per structure in
``starting_magnetization``; the others run non-magnetic.
"""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.plugins import DataFactory
from aiida_hubbard.workflows.hubbard import SelfConsistentHubbardWorkChain

from aiida_eqml.calculations.functions.harvest import harvest_hubbard_labels
from aiida_eqml.workflows.hubbard.fft_grid import with_symmetric_fft_grid
from aiida_eqml.workflows.labels import LabelsWorkChain, protocol_alias, protocol_filepath, structures_to_namespace

HubbardStructureData = DataFactory('quantumespresso.hubbard_structure')

__all__ = ('HubbardLabelsWorkChain', 'OCCUP_TXT', 'harvest_loops')

#: Where pw.x writes the DFT+U+V generalized occupations (relative to the calculation's working folder).
OCCUP_TXT = 'out/aiida.save/occup.txt'
#: SelfConsistentHubbardWorkChain's exit status when max_iterations passed without convergence: labels are fine.
EXIT_NOT_CONVERGED = 601

_LOOP_EXCLUDE = ('hubbard_structure', 'clean_workdir', 'relax')


def validate_starting_magnetization(value, _):
    if value is None:
        return None
    for key, moments in value.get_dict().items():
        if not isinstance(moments, dict) or not all(isinstance(m, (int, float)) for m in moments.values()):
            return f'`starting_magnetization.{key}` must map kind names to numbers, got {moments!r}'


class HubbardLabelsWorkChain(LabelsWorkChain):
    """Hubbard U/V labels of a set of ``HubbardStructureData`` (magnetic or not, U or U+V)."""

    _item_class = SelfConsistentHubbardWorkChain
    _structure_type = HubbardStructureData

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(
            SelfConsistentHubbardWorkChain, namespace='hubbard_loop', exclude=_LOOP_EXCLUDE,
            namespace_options={'help': 'Inputs of the SelfConsistentHubbardWorkChain run for every structure '
                               '(scf.pw.pseudos keyed by element; no relaxation: the geometry is the sample).'},
        )
        spec.input(
            'starting_magnetization', valid_type=orm.Dict, required=False, validator=validate_starting_magnetization,
            help='{structure key: {kind name: starting magnetization}}; these structures run spin polarized '
            '(nspin=2), the others non-magnetic.',
        )
        spec.input('clean_workdir', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Let each SelfConsistentHubbardWorkChain clean its remote folders (occupations are retrieved).')

    @classmethod
    def get_protocol_filepath(cls):
        return protocol_filepath('hubbard')

    @classmethod
    def get_builder_from_protocol(
        cls, pw_code, hp_code, structures, protocol=None, overrides=None, options_pw=None, options_hp=None,
        pseudo_family=None, stringency=None, starting_magnetization=None, **kwargs,
    ):
        """Builder for a list / dict / group of ``HubbardStructureData``.

        :param pw_code, hp_code: the ``quantumespresso.pw`` and ``quantumespresso.hp`` codes.
        :param structures: list, dict (keys become link labels) or ``orm.Group`` of ``HubbardStructureData``.
        :param protocol: ``fast``, ``moderate`` (default) or ``precise``.
        :param overrides: nested dict over the protocol inputs; ``hubbard_loop`` goes to
            ``SelfConsistentHubbardWorkChain.get_builder_from_protocol`` (through our protocol helper, which injects
            the pseudo family / cutoffs of ``aiida-eqml local setup`` and checks the Hubbard manifolds).
        :param starting_magnetization: ``{structure key: {kind: moment}}`` of the magnetic structures (keys as in
            the ``structures`` namespace: ``structure_0000``... for a list).
        :param kwargs: passed on (e.g. ``electronic_type``).
        """
        from aiida_eqml.workflows.protocols import get_builder_from_protocol

        inputs = cls.get_protocol_inputs(protocol, overrides)
        structures = structures_to_namespace(structures)
        magnetization = dict(starting_magnetization or {})
        unknown = sorted(set(magnetization) - set(structures))
        if unknown:
            raise ValueError(f'`starting_magnetization` names structures that are not given: {unknown}')
        for key, structure in structures.items():
            if not isinstance(structure, HubbardStructureData):
                raise TypeError(f'structure `{key}` is a {type(structure).__name__}, not a HubbardStructureData')

        builders = {
            key: get_builder_from_protocol(
                SelfConsistentHubbardWorkChain, pw_code, hp_code, structure, protocol=protocol_alias(protocol),
                overrides=inputs.get('hubbard_loop'), options_pw=options_pw, options_hp=options_hp,
                pseudo_family=pseudo_family, stringency=stringency, **kwargs,
            )
            for key, structure in structures.items()
        }
        largest = max(structures, key=lambda key: len(structures[key].sites))
        template = builders[largest]._inputs(prune=True)
        for key in _LOOP_EXCLUDE:
            template.pop(key, None)
        parameters = template['scf']['pw']['parameters'].get_dict()
        for cutoff in ('ecutwfc', 'ecutrho'):
            parameters['SYSTEM'][cutoff] = max(b.scf.pw.parameters['SYSTEM'][cutoff] for b in builders.values())
        # Spin is set per structure at submission (see `get_item_inputs`).
        for name in ('nspin', 'starting_magnetization'):
            parameters['SYSTEM'].pop(name, None)
        template['scf']['pw']['parameters'] = orm.Dict(parameters)
        pseudos = {}
        for key, builder in builders.items():
            for kind in structures[key].kinds:
                pseudos.setdefault(kind.symbol, builder.scf.pw.pseudos[kind.name])
        template['scf']['pw']['pseudos'] = pseudos
        options = template['scf']['pw'].setdefault('metadata', {}).setdefault('options', {})
        retrieve = list(options.get('additional_retrieve_list', []))
        options['additional_retrieve_list'] = retrieve + [OCCUP_TXT] if OCCUP_TXT not in retrieve else retrieve

        builder = cls.get_builder()
        builder.structures = structures
        builder.hubbard_loop = template
        if magnetization:
            builder.starting_magnetization = orm.Dict(magnetization)
        builder.max_concurrent = orm.Int(inputs['max_concurrent'])
        builder.allow_failures = orm.Bool(inputs['allow_failures'])
        builder.clean_workdir = orm.Bool(inputs['clean_workdir'])
        return builder

    # ------------------------------------------------------------------ checks
    def validate_structure(self, key, structure):
        if not structure.hubbard.parameters:
            return 'it has no Hubbard parameters (initialize U and/or V on the Hubbard manifolds first)'
        missing = sorted({kind.symbol for kind in structure.kinds} - set(self.inputs.hubbard_loop.scf.pw.pseudos))
        if missing:
            return f'no pseudopotential in `hubbard_loop.scf.pw.pseudos` for element(s) {missing}'
        moments = self.inputs.get('starting_magnetization', orm.Dict()).get_dict().get(key)
        if moments is not None:
            unknown = sorted(set(moments) - set(structure.get_kind_names()))
            if unknown:
                return f'`starting_magnetization` names kinds {unknown} that the structure does not have'

    # ------------------------------------------------------------------ per structure
    def get_item_inputs(self, key, structure):
        inputs = AttributeDict(self.exposed_inputs(SelfConsistentHubbardWorkChain, namespace='hubbard_loop'))
        inputs.hubbard_structure = structure
        inputs.clean_workdir = self.inputs.clean_workdir
        parameters = inputs.scf.pw.parameters.get_dict()
        moments = self.inputs.get('starting_magnetization', orm.Dict()).get_dict().get(key)
        if moments:
            parameters['SYSTEM']['nspin'] = 2
            parameters['SYSTEM']['starting_magnetization'] = moments
        else:
            parameters['SYSTEM']['nspin'] = 1
        parameters = with_symmetric_fft_grid(parameters, structure)  # hp.x needs it (e.g. anatase's cell)
        inputs.scf = AttributeDict(inputs.scf)
        inputs.scf.pw = AttributeDict(inputs.scf.pw)
        inputs.scf.pw.parameters = orm.Dict(parameters)
        return inputs

    def is_item_usable(self, node):
        return node.is_finished_ok or node.exit_status == EXIT_NOT_CONVERGED

    @staticmethod
    def finished_hp_iterations(node) -> list[tuple[int, orm.WorkflowNode]]:
        """``[(iteration, HpWorkChain node)]`` of the successful hp.x iterations of one
        SelfConsistentHubbardWorkChain (its call links are labelled ``iteration_NN_hp``), in order."""
        found = []
        for link in node.base.links.get_outgoing(link_label_filter='iteration_%_hp').all():
            if link.node.is_finished_ok:
                found.append((int(link.link_label.split('_')[1]), link.node))
        return sorted(found, key=lambda item: item[0])

    def harvest(self, keys):
        return harvest_loops({key: self.item_node(key) for key in keys})


def harvest_loops(loops: dict):
    """Labels of finished ``SelfConsistentHubbardWorkChain`` nodes ``{key: node}`` -> ``harvest_hubbard_labels``.

    Also usable on loops whose labels work chain failed afterwards (e.g. in its own harvest), so that finished
    DFT work is never run again to get its labels.
    """
    from aiida_eqml.calculations.functions.occupations import extract_occupations

    labels = {}
    for key, loop in loops.items():
        for iteration, hp_node in HubbardLabelsWorkChain.finished_hp_iterations(loop):
            scf_calc = hp_node.inputs.hp.parent_scf.creator
            results, extraction = extract_occupations.run_get_node(
                retrieved=scf_calc.outputs.retrieved, structure=scf_calc.inputs.structure,
                metadata={'call_link_label': f'occupations_{key}_{iteration:02d}'},
            )
            if not extraction.is_finished_ok:  # becomes ERROR_HARVEST_FAILED with this message
                raise ValueError(f'occupations of `{key}` iteration {iteration}: {extraction.exit_message}')
            sample_key = f'{key}_iter{iteration:02d}'
            labels[f'{sample_key}_structure'] = scf_calc.inputs.structure
            labels[f'{sample_key}_occupations'] = results['occupations']
            labels[f'{sample_key}_hubbard'] = hp_node.outputs.hubbard_structure
            if 'output_band' in scf_calc.outputs:  # the state hp.x perturbed, to judge the label by
                labels[f'{sample_key}_scf_parameters'] = scf_calc.inputs.parameters
                labels[f'{sample_key}_scf_output_parameters'] = scf_calc.outputs.output_parameters
                labels[f'{sample_key}_scf_bands'] = scf_calc.outputs.output_band
    if not labels:
        raise ValueError('no hp.x iteration finished successfully')
    return harvest_hubbard_labels(**labels, metadata={'call_link_label': 'harvest_hubbard_labels'})
