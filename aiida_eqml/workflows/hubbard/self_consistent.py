"""``eqml.hubbard.self_consistent``: self-consistent DFT+U(+V) where an equivariant model replaces hp.x.

A sibling of aiida-hubbard's ``SelfConsistentHubbardWorkChain`` with the same inputs where they mean the same thing
(``hubbard_structure``, ``relax``, ``scf``, ``tolerance_onsite``, ``tolerance_intersite``, ``max_iterations``,
``meta_convergence``, ``skip_relax_iterations``, ``relax_frequency``, ``clean_workdir``; ``hubbard`` is the
HpWorkChain of the fallback), plus ``models``. Per iteration:

1. optional relax (``relax`` namespace, ``skip_relax_iterations`` / ``relax_frequency`` as in aiida-hubbard);
2. scf with smearing; for an insulator a second scf with fixed occupations (and, when magnetic, the total
   magnetization of the first, rounded; a non-integer one is exit 405) — aiida-hubbard's recipe, so that the
   occupations the model reads are those hp.x would perturb;
3. occupation matrices of the last scf (``extract_occupations``) -> ``predict_hubbard`` with every model (the
   ensemble mean is the new value, its standard deviation the spread); U-only: one U per kind (QE's card);
4. if a spread exceeds ``uncertainty_threshold`` (eV), hp.x runs on that scf instead and its values are used; every
   hp.x result is harvested into the ``new_labels`` dataset;
5. converged when every parameter changed by less than its tolerance (compared by identity, not list position).

Cheaper than aiida-hubbard at the same result: every scf after the first restarts from the charge density and
wavefunctions of the previous iteration (not after a relaxation), and an insulator's later iterations run only the
fixed-occupation scf, from the previous one's ground state, with its band count and total magnetization (measured:
the same U/V, docs/hubbard_loop.md). The smearing scf is what decides metal or insulator and the magnetization;
it runs again when the geometry moved, when the fixed-occupation scf finds filled and empty bands overlapping in a
spin channel (no gap: the previous verdict no longer holds), and in every iteration with
``smearing_every_iteration`` (aiida-hubbard's recipe). ``validate_with_dfpt`` runs one hp.x on the last
scf and compares it with the prediction made from that same ground state (``dfpt_comparison``).

The models are checked against the structure and the protocol when the inputs are validated: an element, manifold
or V the models never saw, or a cutoff / k density / smearing other than the one of their training labels, is
refused with a message and nothing runs.
"""
from __future__ import annotations

import pathlib

from aiida import orm
from aiida.engine import ToContext, WorkChain, if_, while_
from aiida.orm.nodes.data.array.bands import find_bandgap
from aiida_hubbard.utils.general import set_tot_magnetization
from aiida_hubbard.workflows.hp.main import HpWorkChain
from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData
from aiida_quantumespresso.utils.hubbard import is_intersite_hubbard
from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin
from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain
from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

from aiida_eqml.data.model import EqmlModelData, json_safe
from aiida_eqml.workflows.hubbard import builder as _builder
from aiida_eqml.workflows.hubbard import steps
from aiida_eqml.workflows.hubbard.domain import is_onsite, parameter_changes
from aiida_eqml.workflows.hubbard.inputs import (
    at_least_one,
    non_negative,
    validate_hubbard_structure,
    validate_inputs,
)

__all__ = ('SelfConsistentMLHubbardWorkChain',)


class SelfConsistentMLHubbardWorkChain(ProtocolMixin, WorkChain):
    """Self-consistent Hubbard U/V with a machine-learned hp.x (see the module docstring)."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('hubbard_structure', valid_type=HubbardStructureData, validator=validate_hubbard_structure,
                   help='The structure with its Hubbard manifolds initialized (starting U/V).')
        spec.input_namespace('models', valid_type=EqmlModelData, dynamic=True,
                             help='One `eqml.model` or the members of an ensemble (mean and spread per parameter).')
        spec.input('tolerance_onsite', valid_type=orm.Float, default=lambda: orm.Float(0.1), validator=non_negative,
                   help='Convergence tolerance on U (eV).')
        spec.input('tolerance_intersite', valid_type=orm.Float, default=lambda: orm.Float(0.01), validator=non_negative,
                   help='Convergence tolerance on V (eV).')
        spec.input('uncertainty_threshold', valid_type=orm.Float, required=False, validator=non_negative,
                   help='Ensemble spread (eV) above which an iteration runs hp.x instead of trusting the models.')
        spec.input('validate_with_dfpt', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Run one hp.x at the converged point and output the ML vs DFPT comparison.')
        spec.input('skip_relax_iterations', valid_type=orm.Int, required=False, validator=non_negative,
                   help='Iterations without relaxation and without convergence check at the start.')
        spec.input('relax_frequency', valid_type=orm.Int, required=False, validator=at_least_one,
                   help='Relax every this many iterations.')
        spec.input('radial_analysis', valid_type=orm.Dict, required=False,
                   help='As in aiida-hubbard: a neighbour analysis that sets the V shell radius of hp.x (U+V).')
        spec.input('smearing_every_iteration', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Run the smearing scf in every iteration, as aiida-hubbard does. By default an insulator '
                        'goes straight to the fixed-occupation scf after the first iteration (the smearing scf '
                        'runs again when that scf has no gap or after a relaxation).')
        spec.input('max_iterations', valid_type=orm.Int, default=lambda: orm.Int(10), validator=at_least_one)
        spec.input('anderson_depth', valid_type=orm.Int, default=lambda: orm.Int(0), validator=non_negative,
                   help='Anderson acceleration of the U/V iteration over this many past iterations (0: plain '
                        'iteration, as aiida-hubbard; same fixed point and convergence test, see hubbard.mixing).')
        spec.input('meta_convergence', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Iterate to self-consistency; if False, stop after the first prediction.')
        spec.input('clean_workdir', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Clean the remote folders of every calculation at the end.')
        spec.expose_inputs(PwRelaxWorkChain, namespace='relax', exclude=('clean_workdir', 'structure'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'Inputs of the PwRelaxWorkChain; if given, relax in iterations.'})
        spec.expose_inputs(PwBaseWorkChain, namespace='scf', exclude=('clean_workdir', 'pw.structure'))
        spec.expose_inputs(HpWorkChain, namespace='hubbard',
                           exclude=('clean_workdir', 'hp.parent_scf', 'hp.parent_hp', 'hp.hubbard_structure'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'Inputs of hp.x for the uncertainty fallback and validation.'})
        spec.inputs['hubbard']['hp'].validator = None
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.setup,
            while_(cls.should_run_iteration)(
                cls.update_iteration,
                if_(cls.should_run_relax)(cls.run_relax, cls.inspect_relax),
                if_(cls.should_run_scf_smearing)(cls.run_scf_smearing, cls.inspect_scf_smearing),
                if_(cls.is_insulator)(cls.run_scf_fixed, cls.inspect_scf_fixed),
                if_(cls.lost_gap)(  # the skipped smearing scf was needed after all: this iteration with it
                    cls.run_scf_smearing,
                    cls.inspect_scf_smearing,
                    if_(cls.is_insulator)(cls.run_scf_fixed, cls.inspect_scf_fixed),
                ),
                cls.run_prediction,
                if_(cls.should_run_hp)(cls.run_hp, cls.inspect_hp),
                cls.check_convergence,
            ),
            if_(cls.should_validate)(cls.run_validation, cls.inspect_validation),
            cls.results,
        )
        spec.output('hubbard_structure', valid_type=HubbardStructureData,
                    help='The structure with the self-consistent Hubbard parameters.')
        spec.output('history', valid_type=orm.List,
                    help='Per iteration: U/V with spread and source, energy, moments, gaps, wall times.')
        spec.output('new_labels', valid_type=orm.Data, required=False,
                    help='`eqml.dataset` of every hp.x run of the loop (fallback and validation), ready to retrain on.')
        spec.output('dfpt_comparison', valid_type=orm.Dict, required=False,
                    help='ML vs hp.x per parameter at the converged point (validate_with_dfpt).')
        spec.exit_code(
            402, 'ERROR_SUB_PROCESS_FAILED_RELAX', message='The PwRelaxWorkChain failed in iteration {iteration}'
        )
        spec.exit_code(
            403, 'ERROR_SUB_PROCESS_FAILED_SCF', message='The scf PwBaseWorkChain failed in iteration {iteration}'
        )
        spec.exit_code(404, 'ERROR_SUB_PROCESS_FAILED_HP', message='The HpWorkChain failed in iteration {iteration}')
        spec.exit_code(405, 'ERROR_NON_INTEGER_TOT_MAGNETIZATION',
                       message='The smearing scf of iteration {iteration} has a non-integer total magnetization '
                               '{magnetization}: no fixed-occupation scf is possible (is it a metal?)')
        spec.exit_code(406, 'ERROR_OCCUPATIONS', message='Occupation matrices of iteration {iteration}: {message}')
        spec.exit_code(407, 'ERROR_PREDICTION', message='Prediction in iteration {iteration} failed: {message}')
        spec.exit_code(408, 'ERROR_HARVEST', message='The hp.x results could not be harvested as labels: {message}')
        spec.exit_code(601, 'ERROR_CONVERGENCE_NOT_REACHED',
                       message='The Hubbard parameters did not converge in {iteration} iterations (outputs attached)')

    @classmethod
    def get_protocol_filepath(cls):
        return pathlib.Path(__file__).resolve().parent.parent / 'protocols' / 'hubbard' / 'self_consistent.yaml'

    @classmethod
    def get_builder_from_protocol(cls, pw_code, hubbard_structure, models, protocol=None, hp_code=None,
                                  overrides=None, options_pw=None, options_hp=None, **kwargs):
        """Builder with aiida-hubbard's protocol names (``fast``, ``balanced``, ``stringent``: the tolerances) and
        the DFT settings of the models' training labels (cutoffs, k density, smearing: the model protocol).

        :param models: an ``EqmlModelData``, a list of them (an ensemble) or a dict ``{label: model}``.
        :param hp_code: the hp.x code; without it there is no fallback and no validation.
        :param overrides: nested dict over the protocol (``scf``, ``relax``: adds a relaxation, ``hubbard``, ...).
        :param kwargs: to aiida-quantumespresso's builders (``spin_type``, ``initial_magnetic_moments``, ...).
        """
        return _builder.builder_from_protocol(cls, pw_code, hubbard_structure, models, protocol, hp_code, overrides,
                                              options_pw, options_hp, **kwargs)

    # ------------------------------------------------------------------ loop state
    def setup(self):
        ctx = self.ctx
        ctx.iteration = 0
        ctx.is_converged = False
        ctx.current = self.inputs.hubbard_structure
        if is_intersite_hubbard(ctx.current.hubbard) and 'radial_analysis' in self.inputs:
            from aiida_eqml.workflows.hubbard.functions import expand_intersites

            ctx.current = expand_intersites(ctx.current, self.inputs.radial_analysis,
                                            metadata={'call_link_label': 'expand_intersites'})
        ctx.records, ctx.hp_labels = [], []
        ctx.iterates = []  # (input, output) structures of the map since the last relaxation (Anderson mixing)
        parameters = self.inputs.scf.pw.parameters.get_dict()
        ctx.is_magnetic = parameters.get('SYSTEM', {}).get('nspin', 1) == 2
        ctx.magnetic_moments = parameters['SYSTEM'].get('starting_magnetization') if ctx.is_magnetic else None
        ctx.restart_folder = None
        ctx.skip_relax_iterations = self.inputs.get('skip_relax_iterations', orm.Int(0)).value
        ctx.relax_frequency = self.inputs.get('relax_frequency', orm.Int(1)).value
        # The model loads and compiles while the first scf runs, not after it (measured: the first prediction took
        # 19.5 s of a 195 s TiO2 loop without this; docs/hubbard_loop.md)
        steps.warm_up_prediction(self)

    def should_run_iteration(self):
        return not self.ctx.is_converged and self.ctx.iteration < self.inputs.max_iterations.value

    def update_iteration(self):
        self.ctx.iteration += 1
        self.ctx.record = {'iteration': self.ctx.iteration, 'steps': {}}
        self.ctx.relaxed = False
        self.ctx.smeared = False  # whether this iteration ran a smearing scf
        self.ctx.lost_gap = False

    def should_run_relax(self):
        if 'relax' not in self.inputs or self.ctx.iteration <= self.ctx.skip_relax_iterations:
            return False
        return self.ctx.iteration % self.ctx.relax_frequency == 0

    def should_run_scf_smearing(self):
        """Always in the first iteration, for a metal, after a relaxation and without a ground state to restart
        from; for an insulator's later iterations only with ``smearing_every_iteration``."""
        ctx = self.ctx
        if (self.inputs.smearing_every_iteration.value or ctx.iteration == 1 or ctx.relaxed
                or ctx.restart_folder is None or not ctx.is_insulator):
            return True
        self.report(f'iteration {ctx.iteration}: an insulator in iteration {ctx.iteration - 1}: fixed-occupation '
                    'scf from its ground state, without a smearing scf')
        return False

    def is_insulator(self):
        return self.ctx.is_insulator

    def lost_gap(self):
        return self.ctx.lost_gap

    def should_run_hp(self):
        return self.ctx.use_hp

    def should_validate(self):
        return self.inputs.validate_with_dfpt.value and self.ctx.is_converged

    # ------------------------------------------------------------------ relax / scf
    def run_relax(self):
        inputs = steps.relax_inputs(self)
        running = self.submit(PwRelaxWorkChain, **inputs)
        self.report(f'launching PwRelaxWorkChain<{running.pk}> iteration #{self.ctx.iteration}')
        return ToContext(relax=running)

    def inspect_relax(self):
        node = self.ctx.relax
        steps.record_step(self.ctx.record, 'relax', node)
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_RELAX.format(iteration=self.ctx.iteration)
        self.ctx.current = node.outputs.output_structure
        self.ctx.relaxed = True

    def run_scf_smearing(self):
        self.ctx.smeared = True
        inputs = steps.scf_inputs(self, fixed=False)
        running = self.submit(PwBaseWorkChain, **inputs)
        self.report(f'launching PwBaseWorkChain<{running.pk}> with smeared occupations')
        return ToContext(scf_smearing=running)

    def inspect_scf_smearing(self):
        node = self.ctx.scf_smearing
        steps.record_step(self.ctx.record, 'scf_smearing', node)
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_SCF.format(iteration=self.ctx.iteration)
        self.ctx.last_scf = node
        parameters = node.outputs.output_parameters.get_dict()
        bands = node.outputs.output_band
        # As aiida-hubbard: insulating if either way of placing E_F finds a gap.
        insulator, _ = find_bandgap(bands, fermi_energy=parameters['fermi_energy'])
        if not insulator:
            try:
                insulator, _ = find_bandgap(bands, number_electrons=parameters['number_of_electrons'])
            except Exception:  # aiida's find_bandgap fails on some spin-polarized band layouts
                insulator = False
        self.ctx.is_insulator = bool(insulator)
        self.report(f'iteration {self.ctx.iteration}: the system is {"an insulator" if insulator else "a metal"}')
        if insulator and self.ctx.is_magnetic:
            magnetization = parameters['total_magnetization']
            if not set_tot_magnetization({'SYSTEM': {}}, magnetization):
                return self.exit_codes.ERROR_NON_INTEGER_TOT_MAGNETIZATION.format(
                    iteration=self.ctx.iteration, magnetization=magnetization)

    def run_scf_fixed(self):
        inputs = steps.scf_inputs(self, fixed=True)
        running = self.submit(PwBaseWorkChain, **inputs)
        self.report(f'launching PwBaseWorkChain<{running.pk}> with fixed occupations')
        return ToContext(scf_fixed=running)

    def inspect_scf_fixed(self):
        node = self.ctx.scf_fixed
        steps.record_step(self.ctx.record, 'scf_fixed', node)
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_SCF.format(iteration=self.ctx.iteration)
        self.ctx.last_scf = node
        if not self.ctx.smeared and not steps.has_gap_in_each_channel(node):
            # kept in the history (its time counts), then redone after a smearing scf
            self.ctx.record['steps']['scf_fixed_without_gap'] = self.ctx.record['steps'].pop('scf_fixed')
            self.ctx.lost_gap = True
            self.report(f'iteration {self.ctx.iteration}: the fixed-occupation scf has no gap in a spin channel: '
                        'running the smearing scf after all')

    # ------------------------------------------------------------------ prediction / hp.x
    def run_prediction(self):
        result = steps.predict(self)
        if isinstance(result, str):
            kind, message = result.split(':', 1)
            code = self.exit_codes.ERROR_OCCUPATIONS if kind == 'occupations' else self.exit_codes.ERROR_PREDICTION
            return code.format(iteration=self.ctx.iteration, message=message.strip())
        self.ctx.predicted, self.ctx.spread = result
        spreads = [entry['std'] for entry in self.ctx.spread.get_dict()['parameters']]
        largest = max(spreads) if spreads else 0.0
        self.ctx.record['max_spread'] = largest
        threshold = self.inputs.get('uncertainty_threshold')
        self.ctx.use_hp = threshold is not None and largest > threshold.value
        if self.ctx.use_hp:
            self.report(f'iteration {self.ctx.iteration}: ensemble spread {largest:.3f} eV > {threshold.value} eV: '
                        'running hp.x instead')

    def run_hp(self):
        return self._submit_hp(f'iteration_{self.ctx.iteration:02d}_hp')

    def _submit_hp(self, label: str):
        inputs = steps.hp_inputs(self, label)
        running = self.submit(HpWorkChain, **inputs)
        self.report(f'launching HpWorkChain<{running.pk}> iteration #{self.ctx.iteration}')
        return ToContext(hp=running)

    def inspect_hp(self):
        node = self.ctx.hp
        steps.record_step(self.ctx.record, 'hp', node)
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_HP.format(iteration=self.ctx.iteration)
        self.ctx.hp_labels.append((self.ctx.iteration, self.ctx.last_scf, self.ctx.occupations, node))
        self.ctx.predicted = steps.relabelled_hp_structure(self, node)

    # ------------------------------------------------------------------ convergence
    def check_convergence(self):
        changes = parameter_changes(self.ctx.current.hubbard.parameters, self.ctx.predicted.hubbard.parameters)
        tolerance = {True: self.inputs.tolerance_onsite.value, False: self.inputs.tolerance_intersite.value}
        converged = all(change is not None and change < tolerance[is_onsite(key)] for key, change in changes.items())
        record = self.ctx.record
        record.update(steps.iteration_record(self, changes))
        checked = self.inputs.meta_convergence.value and self.ctx.iteration > self.ctx.skip_relax_iterations
        record['converged'] = bool(converged and checked)
        self.ctx.current, record['next_input'] = steps.next_input(self, record['converged'])
        record = json_safe(record)  # strict JSON for the history node (an unknown gap is NaN in the diagnostics)
        self.ctx.records.append(record)
        self.report(steps.iteration_line(record))
        if not self.inputs.meta_convergence.value:
            self.ctx.is_converged = True  # one prediction only, as aiida-hubbard without meta convergence
            return
        self.ctx.is_converged = record['converged']
        # The next scf starts from this ground state, unless the geometry moved (then positions do not match).
        self.ctx.restart_folder = None if self.ctx.relaxed else self.ctx.last_scf.outputs.remote_folder

    # ------------------------------------------------------------------ validation and results
    def run_validation(self):
        return self._submit_hp('validation_hp')  # hp.x perturbs the last scf: the ground state of the prediction

    def inspect_validation(self):
        node = self.ctx.hp
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_HP.format(iteration=self.ctx.iteration)
        self.ctx.hp_labels.append((self.ctx.iteration, self.ctx.last_scf, self.ctx.occupations, node))
        self.ctx.validation = node

    def results(self):
        from aiida_eqml.workflows.hubbard.functions import compare_ml_dfpt, iteration_history

        self.out('hubbard_structure', self.ctx.current)
        self.out('history', iteration_history(orm.List(self.ctx.records),
                                              metadata={'call_link_label': 'iteration_history'}))
        if self.ctx.hp_labels:
            labels = steps.harvest_hp_labels(self)
            if isinstance(labels, str):
                return self.exit_codes.ERROR_HARVEST.format(message=labels)
            self.out('new_labels', labels)
        if 'validation' in self.ctx:
            self.out('dfpt_comparison', compare_ml_dfpt(
                self.ctx.current, self.ctx.spread, self.ctx.validation.outputs.hubbard_structure,
                metadata={'call_link_label': 'compare_ml_dfpt'}))
        if self.inputs.clean_workdir.value:
            steps.clean_workdir(self)
        if self.inputs.meta_convergence.value and not self.ctx.is_converged:
            return self.exit_codes.ERROR_CONVERGENCE_NOT_REACHED.format(iteration=self.ctx.iteration)
