"""Calcfunctions of the self-consistent ML Hubbard loop: every number it outputs is made by one of these.

* :func:`onsite_by_kind` — QE's HUBBARD card gives a DFT+U (U only) value per *kind*, so the U predicted per site
  are averaged over the sites of a kind (symmetry-equivalent sites agree to float32 rounding; a larger spread is
  reported by the loop, which cannot split kinds without hp.x's symmetry analysis);
* :func:`iteration_history` — the per-iteration table (values, spread, source, energies, moments, gaps, times);
* :func:`compare_ml_dfpt` — ML prediction vs one hp.x run at the same ground state, per parameter;
* :func:`expand_intersites` — DFT+U+V: V on every couple of the first neighbour shell that aiida-hubbard's radial
  analysis keeps of hp.x's answer, so that the model predicts the couples the labels have (the input usually
  seeds one couple per kind, hp.x returns the shell).
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_eqml.workflows.hubbard.domain import is_onsite, parameter_key

__all__ = ('onsite_by_kind', 'iteration_history', 'compare_ml_dfpt', 'parameter_table', 'expand_intersites')


def parameter_table(hubbard_structure) -> list[dict]:
    """``[{'kind': 'U'|'V', 'atoms', 'translation', 'manifolds', 'value', 'label'}]`` of a HubbardStructureData."""
    sites = hubbard_structure.sites
    rows = []
    for parameter in hubbard_structure.hubbard.parameters:
        key = parameter_key(parameter)
        onsite = is_onsite(key)
        name_i, name_j = sites[key[0]].kind_name, sites[key[1]].kind_name
        label = f'U({name_i} {key[3]})' if onsite else f'V({name_i} {key[3]}, {name_j} {key[4]}, {list(key[2])})'
        rows.append({'kind': 'U' if onsite else 'V', 'atoms': [key[0], key[1]], 'translation': list(key[2]),
                     'manifolds': [key[3], key[4]], 'value': float(parameter.value), 'label': label})
    return rows


@calcfunction
def onsite_by_kind(hubbard_structure):
    """The structure with each on-site U replaced by the mean over the sites of its kind (same manifold)."""
    sites = hubbard_structure.sites
    hubbard = hubbard_structure.hubbard
    groups: dict[tuple, list[float]] = {}
    for parameter in hubbard.parameters:
        key = parameter_key(parameter)
        if is_onsite(key):
            groups.setdefault((sites[key[0]].kind_name, key[3]), []).append(float(parameter.value))
    for parameter in hubbard.parameters:
        key = parameter_key(parameter)
        if is_onsite(key):
            parameter.value = float(np.mean(groups[(sites[key[0]].kind_name, key[3])]))
    result = hubbard_structure.clone()
    result.hubbard = hubbard
    return result


@calcfunction
def iteration_history(iterations: orm.List) -> orm.List:
    """Store the loop's per-iteration records (built from the nodes of each iteration) as one output list."""
    return orm.List(list(iterations.get_list()))


@calcfunction
def compare_ml_dfpt(predicted, spread: orm.Dict, dfpt) -> orm.Dict:
    """Per parameter of the DFPT (hp.x) result: ML mean and spread, DFPT value, absolute and relative difference.

    The ML value is the ensemble mean predicted from the validated ground state (``spread``), not the value the
    loop carried on with: when that iteration's spread sent it to hp.x, ``predicted`` holds hp.x's values, and
    comparing those with the validation's hp.x would read as a perfect model."""
    ml = {tuple(p['atoms']) + (tuple(p['translation']),) + tuple(p['manifolds']): p for p in parameter_table(predicted)}
    entries = {(e['atom_index'], e['neighbour_index'], tuple(e['translation'])) + tuple(e['manifolds']): e
               for e in spread.get_dict().get('parameters', [])}
    std = {key: entry['std'] for key, entry in entries.items()}
    rows = []
    for row in parameter_table(dfpt):
        key = tuple(row['atoms']) + (tuple(row['translation']),) + tuple(row['manifolds'])
        if key not in ml:
            continue  # hp.x also returns couples the loop does not use
        ml_value = entries[key]['mean'] if key in entries else ml[key]['value']
        dfpt_value = row['value']
        rows.append({**{k: row[k] for k in ('kind', 'atoms', 'translation', 'manifolds', 'label')},
                     'ml': ml_value, 'ml_std': std.get(key), 'dfpt': dfpt_value,
                     'abs_diff': abs(ml_value - dfpt_value),
                     'rel_diff': abs(ml_value - dfpt_value) / abs(dfpt_value) if dfpt_value else None})
    summary = {}
    for kind in ('U', 'V'):
        rel = [r['rel_diff'] for r in rows if r['kind'] == kind and r['rel_diff'] is not None]
        summary[f'mare_{kind.lower()}'] = float(np.mean(rel)) if rel else None
        summary[f'mae_{kind.lower()}'] = float(np.mean([r['abs_diff'] for r in rows if r['kind'] == kind])) \
            if any(r['kind'] == kind for r in rows) else None
    return orm.Dict({'parameters': rows, **summary})


@calcfunction
def expand_intersites(hubbard_structure, radial_analysis: orm.Dict):
    """The structure with a V on each first-shell couple (aiida-hubbard's ``get_intersites_list``) of every kind pair
    that has one; a new couple takes the manifolds and value of the existing V of its kind pair."""
    from aiida_quantumespresso.utils.hubbard import HubbardUtils

    sites = hubbard_structure.sites
    hubbard = hubbard_structure.hubbard
    seeds, present = {}, set()
    for parameter in hubbard.parameters:
        key = parameter_key(parameter)
        present.add(key[:3])
        if not is_onsite(key):
            seeds.setdefault((sites[key[0]].kind_name, sites[key[1]].kind_name), parameter)
    for i, j, translation in HubbardUtils(hubbard_structure).get_intersites_list(**radial_analysis.get_dict()):
        translation = tuple(int(t) for t in translation)
        seed = seeds.get((sites[i].kind_name, sites[j].kind_name))
        if (i, j, translation) in present or seed is None or (i == j and translation == (0, 0, 0)):
            continue
        hubbard.parameters.append(
            seed.__class__(
                atom_index=i,
                atom_manifold=seed.atom_manifold,
                neighbour_index=j,
                neighbour_manifold=seed.neighbour_manifold,
                translation=translation,
                value=seed.value,
                hubbard_type=seed.hubbard_type,
            )
        )
        present.add((i, j, translation))
    result = hubbard_structure.clone()
    result.hubbard = hubbard
    return result
