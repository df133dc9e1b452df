"""The AiiDA side of ``hubbard_reference_model.py``: the shipped ensemble trained through ``eqml.train.ensemble`` in a
profile, and the campaign's provenance archive (``campaign.aiida``) merged from the cells' own archives."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from hubbard_uv import CAMPAIGN


def train_with_aiida(args, record, config: dict, seeds: list[int], work: Path) -> tuple[list[Path], dict]:
    """``eqml.train.ensemble`` in ``args.profile`` (run in this process, blocking); the member files exported."""
    from aiida import load_profile, orm
    from aiida.engine import run_get_node

    load_profile(args.profile)
    from aiida_eqml.calculations.train import get_or_create_python_code
    from aiida_eqml.data.dataset import EqmlDatasetData
    from aiida_eqml.workflows.train import EqmlEnsembleTrainWorkChain

    code = get_or_create_python_code(orm.load_computer(args.computer))
    dataset = EqmlDatasetData.get_or_create(record)
    builder = EqmlEnsembleTrainWorkChain.get_builder()
    builder.train.code = code
    builder.train.datasets = {"hubbard": dataset}
    builder.train.config = orm.Dict(config)
    builder.train.metadata.options.resources = {"num_machines": 1, "num_mpiprocs_per_machine": 1}
    builder.seeds = orm.List(seeds)
    _, node = run_get_node(builder)
    if not node.is_finished_ok:
        raise SystemExit(f"eqml.train.ensemble <{node.pk}> failed: {node.exit_status} {node.exit_message}")
    files = []
    for seed in seeds:
        model = node.outputs.models[f"seed_{seed}"]
        path = work / f"seed_{seed}.eqml"
        model.export(path)
        files.append(path)
    print(f"  eqml.train.ensemble <{node.pk}>: models {[node.outputs.models[f'seed_{s}'].pk for s in seeds]}")
    return files, {
        "workchain_pk": node.pk,
        "workchain_uuid": node.uuid,
        "dataset_uuid": dataset.uuid,
        "profile": args.profile,
    }


def write_archive(args, out: Path, extra_uuids=(), previous: Path | None = None) -> Path:
    """``verdi archive create`` of the campaign's work chains (uuids from the per-cell json files) and of
    ``extra_uuids`` (the ensemble's training work chain: the members' provenance back to their dataset).

    A campaign spans several working days, each on a fresh machine with a fresh profile, so the profile this runs in
    holds few of the cells' work chains: those it lacks are imported first from the cells' own archives
    (``archives/<key>.aiida``, written at export since the fourteenth session) and from ``previous`` (the archive
    shipped before, which holds the cells of earlier sessions). Cells found in neither (exported in the seventh to
    thirteenth sessions, whose profiles are gone) are left out and counted: their labels keep the pks and uuids in
    their json, not their graph."""
    import subprocess

    from aiida import load_profile, orm

    load_profile(args.profile, allow_switch=True)
    verdi = Path(sys.executable).with_name("verdi")

    def present(wanted):
        if not wanted:
            return set()
        query = orm.QueryBuilder().append(orm.Node, filters={"uuid": {"in": list(wanted)}}, project="uuid")
        return set(query.all(flat=True))

    cells = {}
    for meta in sorted(CAMPAIGN.glob("*.json")):
        meta = json.loads(meta.read_text())
        if meta.get("workchain_uuid"):
            cells[meta["workchain_uuid"]] = meta["key"]
    if not cells:
        raise SystemExit(f"no campaign work chain uuid in {CAMPAIGN}/*.json")
    sources = [CAMPAIGN / "archives" / f"{key}.aiida" for uuid, key in cells.items() if uuid not in present(cells)]
    sources = [path for path in sources if path.exists()]
    if previous is not None and previous.exists():
        sources.append(previous)
    for source in sources:
        subprocess.run([str(verdi), "-p", args.profile, "archive", "import", "--no-import-group", str(source)],
                       check=True, stdout=subprocess.DEVNULL)
    found = present(cells)
    lost = sorted(key for uuid, key in cells.items() if uuid not in found)
    if lost:
        print(f"{len(lost)} of {len(cells)} exported cells have no work chain in this profile nor in an archive "
              f"(labels only): {', '.join(lost)}", file=sys.stderr)
    uuids = [*extra_uuids, *sorted(found)]
    path = out / "campaign.aiida"
    command = [str(verdi), "-p", args.profile, "archive", "create", "--force", "-N", *uuids, "--", str(path)]
    subprocess.run(command, check=True)
    return path
