"""Calcfunctions that turn DFT outputs into an ``eqml.dataset`` node.

Each takes the output nodes of every labelled structure as its inputs, so the dataset node they return is linked
in the provenance graph to every pw.x / ph.x / hp.x calculation that made its labels. Inputs are flat link labels
``<key>_<field>`` with a fixed set of field suffixes (e.g. ``structure_0003_trajectory``; a double underscore
would mean a nested namespace); samples follow the sorted keys.

Units and conventions are those of docs/architecture.md: Angstrom, eV, charge in e; labels are Cartesian.
"""
from __future__ import annotations

import re

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_eqml.data.dataset import EqmlDatasetData
from aiida_eqml.ml.dataset import Dataset, Sample
from aiida_eqml.ml.targets import target_specs

__all__ = (
    'ENERGY_TARGET_SPECS',
    'BORN_TARGET_SPECS',
    'GPA_PER_EV_PER_ANGSTROM3',
    'group_label_inputs',
    'sample_from_structure',
    'energy_sample',
    'born_sample',
    'harvest_energy_labels',
    'harvest_born_labels',
    'HUBBARD_TARGET_SPECS',
    'hubbard_values',
    'hubbard_sample',
    'harvest_hubbard_labels',
    'scf_diagnostics',
)

#: 1 eV/Angstrom^3 in GPa (CODATA 2018 via ase.units: ase.units.GPa = 1/160.21766...).
GPA_PER_EV_PER_ANGSTROM3 = 160.21766208

# Names, levels, formulas and units from the one registry (aiida_eqml.ml.targets). Stress in the ASE sign convention:
# (1/V) dE/d(strain), so a compressed cell has negative diagonal stress; Born charges Z*_{I,ab} = dP_a / dtau_Ib,
# first index the electric field, second the displacement.
ENERGY_TARGET_SPECS = target_specs('energy', 'forces', 'stress')
BORN_TARGET_SPECS = target_specs('born_charges', 'dielectric')


def group_label_inputs(labels: dict, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{'s_0_structure': a, 's_0_parameters': b}`` -> ``{'s_0': {'structure': a, 'parameters': b}}``.

    Every key must carry every field of ``fields`` (``optional`` ones may be absent), otherwise a ValueError names
    what is missing.
    """
    # The shortest key whose rest is a whole field name: `k_scf_parameters` is key `k`, field `scf_parameters`.
    pattern = re.compile(rf'^(?P<key>.+?)_(?P<field>{"|".join(map(re.escape, (*fields, *optional)))})$')
    grouped: dict[str, dict] = {}
    for label, node in labels.items():
        match = pattern.match(label)
        if match is None:
            raise ValueError(f'input `{label}` does not end in one of the fields {fields}')
        grouped.setdefault(match['key'], {})[match['field']] = node
    for key, group in grouped.items():
        missing = [field for field in fields if field not in group]
        if missing:
            raise ValueError(f'structure `{key}` lacks the input(s) {missing}')
    return dict(sorted(grouped.items()))


def sample_from_structure(structure: orm.StructureData, *, name: str, **kwargs) -> Sample:
    """A :class:`Sample` with the geometry of ``structure`` (atomic numbers from the kinds' symbols)."""
    atoms = structure.get_ase()
    info = {'name': name, 'structure_uuid': structure.uuid, **kwargs.pop('info', {})}
    return Sample.from_ase(atoms, info=info, **kwargs)


def energy_sample(
    key: str, structure: orm.StructureData, parameters: orm.Dict, trajectory: orm.TrajectoryData
) -> Sample:
    """Energy (eV), forces (eV/Angstrom) and stress (eV/Angstrom^3, ASE sign) of one pw.x scf."""
    output = parameters.get_dict()
    if 'energy' not in output:
        raise ValueError(f'`{key}`: the pw.x output parameters have no `energy`')
    arrays = set(trajectory.get_arraynames())
    missing = {'forces', 'stress'} - arrays
    if missing:
        raise ValueError(
            f'`{key}`: the pw.x trajectory lacks {sorted(missing)} (run with tprnfor=.true. and tstress=.true.)'
        )
    n_atoms = len(structure.sites)
    forces = np.asarray(trajectory.get_array('forces'))[-1]
    if forces.shape != (n_atoms, 3):
        raise ValueError(f'`{key}`: forces of shape {forces.shape} for {n_atoms} atoms')
    # aiida-quantumespresso gives the stress in GPa with the QE sign (positive = the cell wants to expand);
    # the ASE convention is the opposite sign.
    stress = -np.asarray(trajectory.get_array('stress'))[-1] / GPA_PER_EV_PER_ANGSTROM3
    creator = parameters.creator
    return sample_from_structure(
        structure,
        name=key,
        node_targets={'forces': forces},
        graph_targets={'energy': np.array([output['energy']]), 'stress': 0.5 * (stress + stress.T)},
        info={'calculation_uuid': creator.uuid if creator else None, 'source': 'pw.x'},
    )


def born_sample(key: str, structure: orm.StructureData, parameters: orm.Dict) -> Sample:
    """Born effective charges and eps_inf of one ph.x electric-field run.

    PhParser's ``effective_charges_eu`` comes from the ``tensors.xml`` that ph.x writes: the array
    ``zstareu(3,3,nat)`` in Fortran order, cut into rows of 3. Row ``b`` of atom ``I`` therefore holds
    ``zstareu(:, b, I)`` = (field a = x, y, z) for displacement b, i.e. the parsed matrix is ``Z[b][a]``;
    we transpose it to ``Z*_{I,ab}`` (a: field, b: displacement). The values are those before the acoustic
    sum rule, which we do not impose here (the model learns the raw DFPT response).
    """
    output = parameters.get_dict()
    missing = [name for name in ('dielectric_constant', 'effective_charges_eu') if name not in output]
    if missing:
        raise ValueError(f'`{key}`: the ph.x output parameters lack {missing} (was ph.x run with epsil=.true.?)')
    n_atoms = len(structure.sites)
    parsed = np.asarray(output['effective_charges_eu'], dtype=float)
    if parsed.shape != (n_atoms, 3, 3):
        raise ValueError(f'`{key}`: effective charges of shape {parsed.shape} for {n_atoms} atoms')
    born = np.transpose(parsed, (0, 2, 1))
    dielectric = np.asarray(output['dielectric_constant'], dtype=float)
    creator = parameters.creator
    return sample_from_structure(
        structure,
        name=key,
        node_targets={'born_charges': born},
        graph_targets={'dielectric': 0.5 * (dielectric + dielectric.T)},
        info={'calculation_uuid': creator.uuid if creator else None, 'source': 'ph.x'},
    )


@calcfunction
def harvest_energy_labels(**labels) -> EqmlDatasetData:
    """Inputs ``<key>_structure``, ``<key>_parameters``, ``<key>_trajectory`` per pw.x scf -> ``eqml.dataset``."""
    grouped = group_label_inputs(labels, ('structure', 'parameters', 'trajectory'))
    samples = [energy_sample(key, **group) for key, group in grouped.items()]
    return EqmlDatasetData(Dataset(samples, ENERGY_TARGET_SPECS))


@calcfunction
def harvest_born_labels(**labels) -> EqmlDatasetData:
    """Inputs ``<key>_structure``, ``<key>_parameters`` (ph.x output) per structure -> ``eqml.dataset``."""
    grouped = group_label_inputs(labels, ('structure', 'parameters'))
    samples = [born_sample(key, **group) for key, group in grouped.items()]
    return EqmlDatasetData(Dataset(samples, BORN_TARGET_SPECS))


# ====================================================================== Hubbard U/V (hp.x)
HUBBARD_TARGET_SPECS = target_specs('hubbard_u', 'hubbard_v')


def hubbard_values(hubbard_structure) -> tuple[dict[int, float], dict[tuple[int, ...], float]]:
    """``({atom: U}, {(i, j, S1, S2, S3): V})`` of a ``HubbardStructureData`` (eV).

    An entry with ``i == j`` and ``S = 0`` is on-site (U); every other one is inter-site (V), keyed as in
    ``HubbardStructureData.hubbard.parameters`` and docs/architecture.md (edge i -> j at cell S).
    """
    onsite, intersite = {}, {}
    for parameter in hubbard_structure.hubbard.parameters:
        translation = tuple(int(t) for t in parameter.translation)
        if parameter.atom_index == parameter.neighbour_index and translation == (0, 0, 0):
            onsite[int(parameter.atom_index)] = float(parameter.value)
        else:
            intersite[(int(parameter.atom_index), int(parameter.neighbour_index), *translation)] = float(
                parameter.value
            )
    return onsite, intersite


def _two_spin_channels(blocks: np.ndarray) -> np.ndarray:
    """``[..., nspin, D, D]`` -> ``[..., 2, D, D]``: a non-magnetic run (nspin=1, QE stores the occupation of one
    spin channel) gets two identical channels, so magnetic and non-magnetic samples share one layout."""
    return np.repeat(blocks, 2, axis=-3) if blocks.shape[-3] == 1 else blocks


def _pad_blocks(blocks: np.ndarray, width: int) -> np.ndarray:
    pad = width - blocks.shape[-1]
    return np.pad(blocks, [(0, 0)] * (blocks.ndim - 2) + [(0, pad), (0, pad)]) if pad > 0 else blocks


def hubbard_sample(key: str, structure, occupations, hubbard_out, width: int) -> Sample:
    """One hp.x iteration: inputs = occupations of the scf it perturbed + the U/V of that scf; targets = U/V of hp.x.

    node attributes: ``occupations [n, 2, D, D]`` (QE m order, zero padded; spin channels, see
    :func:`_two_spin_channels`), ``hubbard_l [n]`` (-1: no manifold), ``hubbard_u_scf [n]``;
    edge attributes (U+V only): ``intersite_occupations [M, 2, D, D]``, ``hubbard_v_scf [M, 1]``;
    targets: ``hubbard_u [n, 1]`` (NaN where hp.x gave none), ``hubbard_v`` on the couples hp.x returned.
    """
    n_atoms = len(structure.sites)
    if len(hubbard_out.sites) != n_atoms or not np.allclose(
        [site.position for site in hubbard_out.sites], [site.position for site in structure.sites], atol=1e-6
    ):
        raise ValueError(f'`{key}`: the hp.x output structure does not match the structure of the scf it perturbed')
    inputs = occupations.descriptor_inputs()
    onsite_u, intersite_v = hubbard_values(hubbard_out)
    target_u = np.full((n_atoms, 1), np.nan)
    for atom, value in onsite_u.items():
        target_u[atom, 0] = value
    node_attrs = {
        'occupations': _pad_blocks(_two_spin_channels(inputs['onsite']), width),
        'hubbard_l': inputs['site_l'],
        'hubbard_u_scf': inputs['hubbard_u'],
    }
    edge_attrs, edge_targets = {}, {}
    if len(inputs['intersite_keys']):
        keys = inputs['intersite_keys']
        edge_attrs['intersite_occupations'] = (keys, _pad_blocks(_two_spin_channels(inputs['intersite']), width))
        edge_attrs['hubbard_v_scf'] = (keys, inputs['hubbard_v'][:, None])
    if intersite_v:
        keys = np.array(sorted(intersite_v), dtype=np.int64)
        edge_targets['hubbard_v'] = (keys, np.array([[intersite_v[tuple(k)]] for k in keys.tolist()]))
    creator = occupations.creator
    pw_calc = creator.inputs.retrieved.creator if creator is not None and 'retrieved' in creator.inputs else None
    return sample_from_structure(
        structure,
        name=key,
        node_targets={'hubbard_u': target_u},
        edge_targets=edge_targets,
        node_attrs=node_attrs,
        edge_attrs=edge_attrs,
        info={
            'source': 'hp.x',
            'nspin': int(occupations.nspin),
            'hubbard_type': occupations.hubbard_type,
            'scf_calculation_uuid': pw_calc.uuid if pw_calc is not None else None,
            'hp_structure_uuid': hubbard_out.uuid,
        },
    )


#: Optional inputs of :func:`harvest_hubbard_labels` per hp.x iteration: the scf that hp.x perturbed.
SCF_FIELDS = ('scf_parameters', 'scf_output_parameters', 'scf_bands')


def scf_diagnostics(parameters: dict, output: dict, bands: orm.BandsData) -> dict:
    """Scalars of the pw.x scf that hp.x perturbed, for ``Sample.info`` (what
    :func:`aiida_eqml.ml.hubbard.records.hubbard_label_issues` judges a label by): cutoff, occupations,
    convergence, magnetization, electrons and band gap per spin channel (eV; 0 for a metallic channel)."""
    from aiida_eqml.ml.hubbard.quality import spin_channel_gaps

    system = parameters.get('SYSTEM', {})
    smearing = system.get('occupations') == 'smearing'
    (n_up, gap_up), (n_down, gap_down) = spin_channel_gaps(
        bands.get_bands(), bands.get_array('occupations'), bands.get_array('weights'),
        fermi_energy=output.get('fermi_energy') if smearing else None,
    )
    convergence = output.get('convergence_info', {}).get('scf_conv', {})
    return {
        'ecutwfc': float(system['ecutwfc']) if 'ecutwfc' in system else None,
        'occupations': system.get('occupations', 'fixed'),
        'degauss_ry': system.get('degauss'),
        'scf_converged': bool(convergence.get('convergence_achieved', False)),
        'scf_steps': int(convergence.get('n_scf_steps', output.get('scf_iterations', -1))),
        'total_magnetization': float(output.get('total_magnetization', 0.0)),
        'absolute_magnetization': float(output.get('absolute_magnetization', 0.0)),
        'electrons_up': n_up,
        'electrons_down': n_down,
        'band_gap_up_ev': gap_up,
        'band_gap_down_ev': gap_down,
        'band_gap_ev': float(min(gap_up, gap_down)),
    }


@calcfunction
def harvest_hubbard_labels(**labels) -> EqmlDatasetData:
    """Per hp.x iteration ``<key>_structure`` (the scf's HubbardStructureData), ``<key>_occupations``
    (``eqml.occupations`` of that scf) and ``<key>_hubbard`` (hp.x's output HubbardStructureData) -> dataset.

    Optionally also that scf's input ``<key>_scf_parameters``, ``<key>_scf_output_parameters`` and
    ``<key>_scf_bands`` (all three): then each sample's ``info`` carries :func:`scf_diagnostics`, so that labels
    of a doubtful ground state (metallic, unconverged) can be filtered later."""
    grouped = group_label_inputs(labels, ('structure', 'occupations', 'hubbard'), optional=SCF_FIELDS)
    width = max(int(group['occupations'].get_array('onsite').shape[-1]) for group in grouped.values())
    samples = []
    for key, group in grouped.items():
        present = [field for field in SCF_FIELDS if field in group]
        if present and len(present) != len(SCF_FIELDS):
            raise ValueError(f'structure `{key}`: give all or none of {list(SCF_FIELDS)} (got {present})')
        sample = hubbard_sample(key, group['structure'], group['occupations'], group['hubbard'], width)
        if present:
            sample.info.update(scf_diagnostics(
                group['scf_parameters'].get_dict(), group['scf_output_parameters'].get_dict(), group['scf_bands']
            ))
        samples.append(sample)
    specs = {'hubbard_u': HUBBARD_TARGET_SPECS['hubbard_u']}
    if any(sample.edge_targets for sample in samples):
        specs['hubbard_v'] = HUBBARD_TARGET_SPECS['hubbard_v']
    return EqmlDatasetData(Dataset(samples, specs))
