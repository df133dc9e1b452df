"""``verdi data eqml model import-reference NAME``: the members of a shipped reference ensemble as eqml.model nodes."""
from __future__ import annotations

import json
import re

import pytest
from conftest_train import ensure_entry_points, random_model_file


@pytest.fixture(scope='module', autouse=True)
def storage(aiida_profile):
    """Open the storage before the first command: loading it inside CliRunner would bind aiida's logging to the
    runner's stream, closed after the command (the verdi_data tests do the same through their node fixture)."""
    from aiida import orm

    ensure_entry_points()
    orm.QueryBuilder().append(orm.Node).limit(1).all()


_CAPTURE = {}


@pytest.fixture(autouse=True)
def _no_fd_capture(capfd):
    """Commands run with pytest's fd capture suspended: the command's log handler otherwise ends up closing
    pytest's capture file once the (jax-importing) hubbard modules are loaded ("I/O operation on closed file");
    CliRunner still captures the command's output."""
    _CAPTURE['fd'] = capfd
    yield
    _CAPTURE.clear()


def invoke(*args):
    from click.testing import CliRunner

    from aiida_eqml.cli.verdi_data import data_eqml

    with _CAPTURE['fd'].disabled():
        return CliRunner().invoke(
            data_eqml, ['model', 'import-reference', *[str(a) for a in args]], catch_exceptions=False
        )


@pytest.fixture
def reference_dir(tmp_path, monkeypatch):
    """A reference directory in the loader's format (two random-weight model files: importing needs no training)."""
    from aiida_eqml.ml.hubbard import reference
    from aiida_eqml.ml.modelfile import file_sha256

    directory = tmp_path / 'hubbard-tmo'
    directory.mkdir()
    members = []
    for k in range(2):
        path, _ = random_model_file(directory / f'member_{k:02d}.eqml', seed=k)
        members.append({'file': path.name, 'sha256': file_sha256(path), 'seed': k})
    metadata = {'protocol': {'name': 'eqml-hubbard-reference-v1'}, 'protocol_fingerprint': 'abc',
                'training_materials': ['NiO-rocksalt-afm2'], 'species': ['O', 'Ti'],
                'errors': {'summary': {'mare_u': 0.1}}}
    (directory / 'ensemble.json').write_text(json.dumps(
        {'format': 'aiida-eqml-ensemble', 'format_version': 1, 'members': members, 'metadata': metadata}))
    monkeypatch.setattr(reference, 'REFERENCE_DIR', tmp_path)
    return directory


def test_import_reference_stores_the_members_once(aiida_profile, reference_dir):
    from aiida import orm

    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.modelfile import file_sha256

    ensure_entry_points()
    result = invoke('hubbard-tmo')
    assert result.exit_code == 0, result.output
    pks = [int(pk) for pk in re.search(r'eqml.model nodes ([\d ]+)', result.output).group(1).split()]
    assert len(pks) == 2
    for k, pk in enumerate(pks):
        node = orm.load_node(pk)
        assert isinstance(node, EqmlModelData)
        assert node.sha256 == file_sha256(reference_dir / f'member_{k:02d}.eqml')
        extra = node.base.extras.get('eqml_reference')
        assert (
            extra['name'] == 'hubbard-tmo'
            and extra['member'] == k
            and extra['protocol_name'] == 'eqml-hubbard-reference-v1'
        )
        assert extra['training_materials'] == ['NiO-rocksalt-afm2'] and extra['errors'] == {'mare_u': 0.1}
    again = invoke('hubbard-tmo')
    assert [int(pk) for pk in re.search(r'eqml.model nodes ([\d ]+)', again.output).group(1).split()] == pks

    listing = invoke('--list')
    assert listing.exit_code == 0 and re.search(r'hubbard-tmo\s+yes', listing.output)


def test_unknown_or_missing_reference_is_refused(aiida_profile, tmp_path, monkeypatch):
    from aiida_eqml.ml.hubbard import reference

    result = invoke('no-such-model')
    assert result.exit_code != 0 and 'unknown reference model' in result.output and 'hubbard-tmo' in result.output
    monkeypatch.setattr(reference, 'REFERENCE_DIR', tmp_path)
    result = invoke('hubbard-tmo')
    assert result.exit_code != 0 and 'hubbard_reference_model.py' in result.output


def test_the_shipped_campaign_archive_holds_every_exported_cell():
    """hubbard-tmo ships `verdi archive create` of the label campaign: every exported cell's work chain, with its
    hp.x calculations, readable without importing (and the package data stays under 30 MB)."""
    import json
    from pathlib import Path

    from aiida import orm
    from aiida.tools.archive.abstract import get_format

    from aiida_eqml.ml.hubbard import reference

    root = Path(reference.__file__).resolve().parent / 'reference' / 'hubbard-tmo'
    archive = root / 'campaign.aiida'
    if not archive.exists():
        pytest.skip('no campaign archive shipped')
    campaign = Path(__file__).resolve().parents[2] / 'benchmarks' / 'data' / 'hubbard_campaign'
    with get_format().open(archive, 'r') as reader:
        labels = (
            reader.querybuilder()
            .append(orm.WorkChainNode, filters={'attributes.process_label': 'HubbardLabelsWorkChain'}, project='uuid')
            .all(flat=True)
        )
        n_hp = (
            reader.querybuilder().append(orm.CalcJobNode, filters={'attributes.process_label': 'HpCalculation'}).count()
        )
    archived = set(labels)
    # the cells exported when the archive was made are in it (cells labelled later wait for the next archive)
    exported = [json.loads(p.read_text()) for p in sorted(campaign.glob('*.json'))]
    in_archive = [m for m in exported if m.get('workchain_uuid') in archived]
    assert len(in_archive) >= 30 and n_hp >= len(in_archive)
    assert sum(p.stat().st_size for p in root.iterdir()) < 30 * 2**20
