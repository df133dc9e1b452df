"""Label-generation work chains: run DFT on a set of structures and harvest the results into an ``eqml.dataset``.

All three share :class:`LabelsWorkChain`, which owns the bookkeeping:

* ``structures``: a dynamic namespace of structures (``get_builder_from_protocol`` fills it from a list, a dict
  or an ``orm.Group``); keys are link labels, the samples of the dataset keep that order (sorted keys);
* bounded concurrency: at most ``max_concurrent`` sub-processes run at a time; the outline loops, submitting
  the next round when the previous one has finished (rounds, not a sliding window: an outline step can only
  wait for all of its awaitables);
* restart safety: the queue (``ctx.pending``), the finished/failed bookkeeping and the sub-processes (via
  ``to_context``) live in the context only, so a daemon restart resumes from the last checkpoint;
* harvesting: a calcfunction (``aiida_eqml.calculations.functions.harvest``) takes the outputs of every finished
  sub-process as inputs and returns the dataset node, so its provenance leads to each calculation.

Failure policy: with ``allow_failures=False`` (default) the first failed sub-process stops the submission of new
ones and the work chain exits with ``ERROR_SUB_PROCESS_FAILED`` naming it (nothing is harvested); with
``allow_failures=True`` the successful ones are harvested and the failures are reported.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
from aiida import orm
from aiida.engine import WorkChain, while_
from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin

from aiida_eqml.data.dataset import EqmlDatasetData

__all__ = ('LabelsWorkChain', 'structures_to_namespace', 'protocol_alias', 'protocol_filepath')

_LINK_LABEL = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')

# Our protocol names follow the issue (fast/moderate/precise); aiida-quantumespresso 5.x calls them
# fast/balanced/stringent.
_QE_PROTOCOL = {'fast': 'fast', 'moderate': 'balanced', 'precise': 'stringent'}


def protocol_alias(protocol: str | None) -> str | None:
    """Name of the aiida-quantumespresso / aiida-hubbard protocol matching one of ours."""
    if protocol is None:
        return None
    return _QE_PROTOCOL.get(protocol, protocol)


def protocol_filepath(name: str) -> pathlib.Path:
    """The YAML protocol file ``aiida_eqml/workflows/protocols/labels/<name>.yaml``."""
    return pathlib.Path(__file__).resolve().parent.parent / 'protocols' / 'labels' / f'{name}.yaml'


def structure_problem(structure) -> str | None:
    """Why ``structure`` cannot be labelled (NaN, degenerate cell, overlapping atoms...), or None.

    The check every entry point makes (:mod:`aiida_eqml.ml.structure_checks`); the minimum distance over all pairs
    (minimum image) here, where no neighbour list exists: DFT structures are small.
    """
    from aiida_eqml.ml.structure_checks import StructureError, check_min_distance, validate_atoms

    atoms = structure.get_ase()
    try:
        validate_atoms(atoms)
        if len(atoms) > 1:
            i, j = np.triu_indices(len(atoms), 1)
            check_min_distance(atoms.get_all_distances(mic=bool(atoms.pbc.any()))[i, j], i, j)
    except StructureError as exception:
        return str(exception)
    return None


def structures_to_namespace(structures, prefix: str = 'structure') -> dict:
    """Turn a list, dict or ``orm.Group`` of structures into ``{link_label: structure}``.

    A list or group gives ``structure_0000, structure_0001, ...`` (group members ordered by pk, so the order is
    reproducible); a dict keeps its keys, which must be valid link labels.
    """
    if isinstance(structures, orm.Group):
        group = structures
        members = sorted(group.nodes, key=lambda node: node.pk)
        structures = [node for node in members if isinstance(node, orm.StructureData)]
        if not structures:
            raise ValueError(f'group `{group.label}` holds no StructureData nodes')
    if isinstance(structures, orm.StructureData):
        structures = [structures]
    if isinstance(structures, dict):
        items = dict(structures)
    else:
        items = {f'{prefix}_{index:04d}': structure for index, structure in enumerate(structures)}
    for key, structure in items.items():
        if not _LINK_LABEL.match(key):
            raise ValueError(f'structure key `{key}` is not a valid link label (letters, digits, underscores)')
        if not isinstance(structure, orm.StructureData):
            raise TypeError(f'structure `{key}` is a {type(structure).__name__}, not a StructureData')
    return items


def validate_max_concurrent(value, _):
    if value is not None and value.value < 1:
        return f'`max_concurrent` must be at least 1, got {value.value}'


class LabelsWorkChain(ProtocolMixin, WorkChain):
    """Run one sub-process per structure, at most ``max_concurrent`` at a time, then harvest a dataset.

    Subclasses set ``_item_class`` and implement :meth:`get_item_inputs` (inputs of the sub-process of one
    structure), :meth:`harvest` (call the harvest calcfunction on the finished sub-processes) and may override
    :meth:`validate_structure` (return an error string to reject a structure before anything runs).
    """

    _item_class = None
    _structure_type = orm.StructureData

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace(
            'structures', valid_type=cls._structure_type, dynamic=True, required=False, populate_defaults=False,
            help='The structures to label, keyed by link label; the samples of the dataset follow the sorted keys.',
        )
        spec.input(
            'max_concurrent', valid_type=orm.Int, default=lambda: orm.Int(4), validator=validate_max_concurrent,
            help='At most this many sub-processes run at the same time.',
        )
        spec.input(
            'allow_failures', valid_type=orm.Bool, default=lambda: orm.Bool(False),
            help='If True, harvest the structures whose sub-process succeeded and only report the failed ones; '
            'if False, the first failure stops the work chain with ERROR_SUB_PROCESS_FAILED.',
        )
        spec.outline(
            cls.setup,
            while_(cls.should_submit)(
                cls.submit_round,
                cls.inspect_round,
            ),
            cls.run_harvest,
            cls.results,
        )
        spec.output(
            'dataset', valid_type=EqmlDatasetData, help='The eqml.dataset with one sample per harvested label set.'
        )
        spec.exit_code(300, 'ERROR_NO_STRUCTURES', message='No structures were given in the `structures` namespace.')
        spec.exit_code(301, 'ERROR_INVALID_STRUCTURE', message='Structure `{key}` cannot be labelled: {reason}')
        spec.exit_code(302, 'ERROR_INVALID_PARAMETERS', message='The DFT parameters cannot give these labels: {reason}')
        spec.exit_code(
            401, 'ERROR_SUB_PROCESS_FAILED', message='The sub-process(es) of structure(s) {failed} failed: {details}'
        )
        spec.exit_code(
            402,
            'ERROR_NOTHING_TO_HARVEST',
            message='No sub-process produced usable labels, nothing to harvest: {details}',
        )
        spec.exit_code(403, 'ERROR_HARVEST_FAILED', message='Harvesting the labels failed: {details}')

    # ------------------------------------------------------------------ hooks for subclasses
    def validate_parameters(self) -> str | None:
        """Return a reason why the DFT parameters cannot give these labels, or None."""
        return None

    def validate_structure(self, key: str, structure) -> str | None:
        """Return a reason to reject ``structure`` before anything runs, or None."""
        return None

    def get_item_inputs(self, key: str, structure) -> dict:
        raise NotImplementedError

    def is_item_usable(self, node) -> bool:
        """Whether a terminated sub-process gives labels (default: it finished with exit status 0)."""
        return node.is_finished_ok

    def harvest(self, keys: list[str]):
        """Return the dataset node made by the harvest calcfunction from the usable sub-processes of ``keys``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ outline
    def setup(self):
        structures = dict(self.inputs.get('structures', {}))
        if not structures:
            return self.exit_codes.ERROR_NO_STRUCTURES
        reason = self.validate_parameters()
        if reason:
            return self.exit_codes.ERROR_INVALID_PARAMETERS.format(reason=reason)
        for key in sorted(structures):
            reason = structure_problem(structures[key]) or self.validate_structure(key, structures[key])
            if reason:
                return self.exit_codes.ERROR_INVALID_STRUCTURE.format(key=key, reason=reason)
        # Everything the loop needs is in the context (plain lists/dicts of strings): restart safe.
        self.ctx.pending = sorted(structures)
        self.ctx.running = []
        self.ctx.usable = []
        self.ctx.failed = {}

    def should_submit(self):
        if self.ctx.failed and not self.inputs.allow_failures.value:
            return False
        return bool(self.ctx.pending)

    def submit_round(self):
        size = self.inputs.max_concurrent.value
        batch, self.ctx.pending = self.ctx.pending[:size], self.ctx.pending[size:]
        self.ctx.running = batch
        futures = {}
        for key in batch:
            inputs = self.get_item_inputs(key, self.inputs.structures[key])
            inputs.setdefault('metadata', {})['call_link_label'] = key
            node = self.submit(self._item_class, **inputs)
            self.report(f'submitted {self._item_class.__name__}<{node.pk}> for `{key}`')
            futures[self._context_key(key)] = node
        self.to_context(**futures)

    def inspect_round(self):
        for key in self.ctx.running:
            node = self.ctx[self._context_key(key)]
            if self.is_item_usable(node):
                self.ctx.usable.append(key)
            else:
                self.ctx.failed[key] = f'{node.process_label}<{node.pk}> exit status {node.exit_status}' + (
                    f' ({node.exit_message})' if node.exit_message else ''
                )
                self.report(f'`{key}`: {self.ctx.failed[key]}')
        self.ctx.running = []

    def run_harvest(self):
        if self.ctx.failed and not self.inputs.allow_failures.value:
            failed = ', '.join(f'`{key}`' for key in self.ctx.failed)
            details = '; '.join(f'{key}: {text}' for key, text in self.ctx.failed.items())
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED.format(failed=failed, details=details)
        if not self.ctx.usable:
            details = '; '.join(f'{key}: {text}' for key, text in self.ctx.failed.items()) or 'no sub-process ran'
            return self.exit_codes.ERROR_NOTHING_TO_HARVEST.format(details=details)
        if self.ctx.failed:
            self.report(f'harvesting {len(self.ctx.usable)} structures, skipping failed: {sorted(self.ctx.failed)}')
        try:
            self.ctx.dataset = self.harvest(sorted(self.ctx.usable))
        except ValueError as exception:
            return self.exit_codes.ERROR_HARVEST_FAILED.format(details=str(exception))

    def results(self):
        self.out('dataset', self.ctx.dataset)
        self.report(f'dataset<{self.ctx.dataset.pk}>: {self.ctx.dataset.n_samples} samples')

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _context_key(key: str) -> str:
        return f'item_{key}'

    def item_node(self, key: str):
        return self.ctx[self._context_key(key)]
