"""A Hubbard record that mixes DFT+U labels (no couples) and DFT+U+V labels trains and is scored.

Real labels of the reference campaign (benchmarks/data/hubbard_campaign): AFM-II NiO (U only) and LiCoO2 (U+V).
Before, building the graphs of the U-only samples failed (``reshape(0, -1)`` of their empty couple arrays) and so
did the metrics of a batch without any V label.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CAMPAIGN = Path(__file__).resolve().parents[2] / 'benchmarks' / 'data' / 'hubbard_campaign'


def test_mixed_u_and_uv_record_trains(tmp_path):
    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.modelfile import read_model_file
    from aiida_eqml.ml.train_cli import main

    paths = [CAMPAIGN / 'NiO_rocksalt_afm2_s100.npz', CAMPAIGN / 'LiCoO2_layered_s100.npz']
    if not all(path.exists() for path in paths):
        pytest.skip('campaign labels not present')
    records = [Dataset.load(path) for path in paths]
    specs = {**records[0].target_specs, **records[1].target_specs}
    assert 'hubbard_v' in specs and 'hubbard_v' not in records[0].target_specs
    merged = Dataset([s for r in records for s in r.samples], specs)
    merged.save(tmp_path / 'mixed.npz')
    config = {'model': {'cutoff': 4.0, 'hidden_irreps': '8x0e + 2x1o + 2x2e', 'num_layers': 1}, 'epochs': 2,
              'batch_size': 1, 'split': {'train': list(range(len(merged))), 'val': [], 'test': []}, 'progress': False}
    (tmp_path / 'config.json').write_text(json.dumps(config))
    status = main(['--dataset', str(tmp_path / 'mixed.npz'), '--config', str(tmp_path / 'config.json'),
                   '--out', str(tmp_path / 'run')])
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert status == 0, metrics.get('message')
    train = metrics['metrics']['train']
    # U on every TM site (2 Ni x 2 iterations + 1 Co x 3 iterations), V only on the LiCoO2 couples
    assert train['hubbard_u']['count'] == 2 * 2 + 3
    assert train['hubbard_v']['count'] == sum(len(s.edge_targets['hubbard_v'].keys) for s in records[1].samples)
    _, _, metadata = read_model_file(tmp_path / 'run' / 'model.eqml')
    assert metadata['protocol']['name'] == 'eqml-hubbard-reference-v1'  # the labels' protocol travels with the model
    assert metadata['hubbard']['manifold_ls'] == [1, 2] and np.isfinite(train['hubbard_v']['mae'])
    # which elements carried the labels, for the ML loop's domain check (the descriptor knows only l)
    assert metadata['hubbard']['u_species'] == ['Co', 'Ni']
    assert metadata['hubbard']['v_species_pairs'] == [['Co', 'O']]
