"""Reports of the Hubbard label campaign (``benchmarks/hubbard_campaign.py plan --markdown`` and ``summary``): the
labelled cells as a Markdown table, and the label counts against the issue's targets as JSON. Read from the exported
files of the campaign the ``hubbard_campaign`` module passed in works on (its ``--protocol``): passed, not
imported, because run as a script that module is ``__main__``, and an import would make a second one."""
from __future__ import annotations

import json
import subprocess

import numpy as np


def markdown_table(campaign) -> None:
    """The labelled cells as a Markdown table (docs/hubbard_campaign.md is pasted from this)."""
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.records import hubbard_label_issues

    print('| cell | type | iterations | wall (s) | scf smearing / fixed / hp.x per iteration (s) | gap (eV) '
          '| U (eV) per iteration | V (eV) | flagged |')
    print('|---|---|---|---|---|---|---|---|---|')
    for key, _name, _strain in campaign.plan():
        if campaign.state(key) != 'done':
            continue
        meta = json.loads((campaign.DATA / f'{key}.json').read_text())
        record = Dataset.load(campaign.DATA / f'{key}.npz')
        samples = sorted(record.samples, key=lambda s: s.info['iteration'] or 0)
        steps = {}
        for step in meta['steps']:
            kind = step['step'].split('_', 2)[-1].replace('_magnetic', '')
            steps.setdefault(kind, []).append(step['wall_s'])
        timing = ' / '.join(
            f"{sum(v) / len(v):.0f}"
            for k, v in sorted(steps.items(), key=lambda kv: ('smearing' not in kv[0], 'hp' in kv[0]))
        )
        u = ', '.join(f"{np.nanmax(s.node_targets['hubbard_u']):.2f}" for s in samples)
        v = samples[-1].edge_targets.get('hubbard_v')
        v_text = f"{float(np.mean(v.values)):.2f}" if v is not None and len(v.keys) else '-'
        gap = min(samples[-1].info['band_gap_up_ev'], samples[-1].info['band_gap_down_ev'])
        flagged = sum(bool(hubbard_label_issues(s.info)) for s in samples)
        print(f"| {key} | {meta['structure_type']} {meta['order']} {meta['hubbard']} | {len(samples)} | "
              f"{meta['wall_s']:.0f} | {timing} | {gap:.2f} | {u} | {v_text} | {flagged}/{len(samples)} |")



#: The issue's targets for the campaign: materials with usable labels, U labels, symmetry-distinct V labels.
TARGETS = {'materials': 8, 'u_labels': 120, 'v_distinct_labels': 30}


def summary(campaign, args) -> None:
    """Counts per cell and in total (all labels, and the usable ones: scf passing the quality filter), against
    :data:`TARGETS`; writes the campaign's summary (``docs/benchmarks/hubbard_campaign.json`` for ``gamma``) with
    the command line and the commit."""
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.evaluation import distinct_v_couples
    from aiida_eqml.ml.hubbard.records import hubbard_label_issues

    cells, materials = [], set()
    totals = dict.fromkeys(('hp_runs', 'hp_runs_usable', 'u_labels', 'u_usable', 'v_labels', 'v_usable',
                            'v_distinct_labels', 'v_distinct_usable', 'wall_s'), 0)
    for key, name, strain in campaign.plan():
        entry = {'key': key, 'material': name, 'strain': strain, 'state': campaign.state(key)}
        if entry['state'] != 'todo':
            meta = json.loads((campaign.DATA / f'{key}.json').read_text())
            entry.update(wall_s=meta['wall_s'], exit_status=meta['exit_status'])
            totals['wall_s'] += meta['wall_s'] or 0
        if entry['state'] == 'done':
            counts = dict.fromkeys(('n_samples', 'n_flagged', 'u', 'v', 'v_distinct'), 0)
            for sample in Dataset.load(campaign.DATA / f'{key}.npz').samples:
                usable = not hubbard_label_issues(sample.info)
                u = sample.node_targets.get('hubbard_u')
                n_u = int(np.isfinite(u).sum()) if u is not None else 0
                v = sample.edge_targets.get('hubbard_v')
                n_v = int(np.isfinite(v.values).sum()) if v is not None else 0
                n_distinct = distinct_v_couples(sample)
                counts['n_samples'] += 1
                counts['n_flagged'] += not usable
                counts['u'] += n_u
                counts['v'] += n_v
                counts['v_distinct'] += n_distinct
                for field, value in (
                    ('hp_runs', 1),
                    ('u_labels', n_u),
                    ('v_labels', n_v),
                    ('v_distinct_labels', n_distinct),
                ):
                    totals[field] += value
                    if usable:
                        totals[field.replace('_labels', '_usable') if field != 'hp_runs' else 'hp_runs_usable'] += value
                if usable and (n_u or n_v):
                    materials.add(name)
            entry.update(counts)
        cells.append(entry)
    totals['materials_usable'] = sorted(materials)
    met = {'materials': len(materials) >= TARGETS['materials'], 'u_labels': totals['u_usable'] >= TARGETS['u_labels'],
           'v_distinct_labels': totals['v_distinct_usable'] >= TARGETS['v_distinct_labels']}
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            cwd=campaign.HERE).stdout.strip()
    payload = {
        'command': ' '.join(['python', 'benchmarks/hubbard_campaign.py', *args.argv]),
        'commit': commit, 'protocol': campaign.protocol(), 'targets': TARGETS, 'targets_met': met,
        'counting': 'usable = the perturbed scf passes hubbard_label_issues (converged, gapped in both spin channels); '
                    'V symmetry-distinct: per hp.x run, couples in distinct (spglib orbit pair, bond length) classes '
                    '(aiida_eqml.ml.hubbard.evaluation.distinct_v_couples)',
        'totals': totals, 'cells': cells,
    }
    campaign.SUMMARY.write_text(json.dumps(payload, indent=1) + '\n')
    print(
        f"{len(cells)} cells: {sum(c['state'] == 'done' for c in cells)} done, "
        f"{sum(c['state'] == 'failed' for c in cells)} failed; {totals['hp_runs']} hp.x runs "
        f"({totals['hp_runs_usable']} usable); U {totals['u_usable']} usable of {totals['u_labels']}; "
        f"V {totals['v_usable']} usable of {totals['v_labels']}, symmetry-distinct {totals['v_distinct_usable']} "
        f"usable of {totals['v_distinct_labels']}; {len(materials)} materials with usable "
        f"labels; targets met: {met} -> {campaign.SUMMARY}"
    )


def _first_and_last(record) -> tuple:
    samples = sorted(record.samples, key=lambda s: s.info['iteration'] or 0)
    return samples[0], samples[-1]


def _u_mean(sample) -> float:
    u = np.asarray(sample.node_targets['hubbard_u'], float)
    return float(np.nanmean(u)) if np.isfinite(u).any() else float('nan')


def _v_values(sample) -> list[float]:
    target = sample.edge_targets.get('hubbard_v')
    if target is None:
        return []
    values = np.asarray(target.values, float).reshape(len(target.keys), -1)[:, 0]
    return [float(v) for v in values if np.isfinite(v)]


def compare(campaign, args) -> None:
    """Every cell labelled by both the current campaign (``--protocol``, a q mesh) and the reference campaign
    (``--against``, ``gamma`` unless told): hp.x on the reference's q mesh against this one. The first iteration is
    the clean comparison (both scf ran with the same starting U / V, so only hp.x's q mesh differs); the last is what
    each loop converged to. Writes ``docs/benchmarks/hubbard_campaign_<protocol>_vs_<against>.json`` and prints a
    table."""
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.records import hubbard_label_issues

    against = args.against
    if campaign.CAMPAIGN == against:
        raise SystemExit(f'compare: --protocol and --against are both {against}: give two campaigns, '
                         'e.g. --protocol q333 compare --against q222')
    reference, meshed = campaign.CAMPAIGN_FILES[against][0], campaign.DATA
    rows = []
    for key, name, strain in campaign.plan():
        if not ((reference / f'{key}.npz').exists() and (meshed / f'{key}.npz').exists()):
            continue
        row = {'key': key, 'material': name, 'strain': strain}
        for label, folder in (('reference', reference), ('mesh', meshed)):
            first, last = _first_and_last(Dataset.load(folder / f'{key}.npz'))
            row[label] = {
                'iterations': int(last.info['iteration'] or 0),
                'u_first': _u_mean(first), 'u_last': _u_mean(last),
                'v_first': _v_values(first), 'v_last': _v_values(last),
                'gap_last_ev': min(last.info['band_gap_up_ev'], last.info['band_gap_down_ev']),
                'flagged': [s.info.get('name') for s in (first, last) if hubbard_label_issues(s.info)],
            }
        row['d_u_first'] = row['mesh']['u_first'] - row['reference']['u_first']
        row['d_u_first_rel'] = row['d_u_first'] / row['reference']['u_first']
        row['d_u_last'] = row['mesh']['u_last'] - row['reference']['u_last']
        rows.append(row)
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            cwd=campaign.HERE).stdout.strip()
    out = campaign.DOCS / f'hubbard_campaign_{campaign.CAMPAIGN}_vs_{against}.json'
    from aiida_eqml.ml.hubbard.protocol import CAMPAIGN_PROTOCOLS

    reference_protocol = CAMPAIGN_PROTOCOLS[against]
    mesh = 'x'.join(map(str, campaign.protocol()['hp_qpoints']))
    reference_mesh = 'x'.join(map(str, reference_protocol['hp_qpoints']))
    payload = {'command': ' '.join(['python', 'benchmarks/hubbard_campaign.py', *args.argv]), 'commit': commit,
               'protocol': campaign.protocol(), 'reference_protocol': reference_protocol,
               'what': 'per cell labelled at both protocols: mean U over Hubbard sites and the V values of the first '
                       f'iteration (same scf input) and of the last, on the q mesh of {against} (key reference, '
                       f'{reference_mesh}) and on the q mesh of protocol (key mesh, {mesh})',
               'cells': rows}
    out.write_text(json.dumps(payload, indent=1) + '\n')
    print(f'| cell | U first, {reference_mesh} -> {mesh} (eV) | change | U last, {reference_mesh} -> {mesh} | '
          f'V first, {reference_mesh} -> {mesh} | gap last (eV) |\n|---|---|---|---|---|---|')
    for r in rows:
        g, q = r['reference'], r['mesh']

        def v_text(values):
            return f'{min(values):+.2f}..{max(values):+.2f}' if values else '-'

        print(f"| {r['key']} | {g['u_first']:.3f} -> {q['u_first']:.3f} | {r['d_u_first']:+.3f} "
              f"({100 * r['d_u_first_rel']:+.0f} %) | {g['u_last']:.3f} -> {q['u_last']:.3f} | "
              f"{v_text(g['v_first'])} -> {v_text(q['v_first'])} | {g['gap_last_ev']:.2f} / {q['gap_last_ev']:.2f} |")
    print(f'{len(rows)} cells -> {out}')
