"""Train and write the shipped reference Hubbard ensemble (``aiida_eqml/ml/hubbard/reference/<name>/``).

    # default: the campaign labels, the quality filter, 4 members through the training run the eqml.train CalcJob
    # makes (aiida_eqml.ml.train_cli, one run per seed on one shared split), written as package data
    .venv/bin/python benchmarks/hubbard_reference_model.py --evaluation docs/benchmarks/hubbard_uv.json

    # the same through AiiDA: eqml.train.ensemble (EqmlEnsembleTrainWorkChain) in PROFILE, members as eqml.model
    # nodes, plus an AiiDA archive of the campaign's provenance in the reference directory
    .venv/bin/python benchmarks/hubbard_reference_model.py --profile eqml --computer localhost --archive

    # after a new evaluation of the same labels: only its errors into the shipped metadata (members unchanged)
    .venv/bin/python benchmarks/hubbard_reference_model.py --errors-only --evaluation docs/benchmarks/hubbard_uv.json

    # a cheap check of the pipeline into a scratch directory
    .venv/bin/python benchmarks/hubbard_reference_model.py --epochs 5 --members 2 --out /tmp/hubbard-tmo

Writes into ``--out`` (default ``aiida_eqml/ml/hubbard/reference/hubbard-tmo``): ``member_XX.eqml``,
``ensemble.json`` (members' sha256; ``metadata``: protocol, species, manifolds, training materials, label counts,
flagged labels, measured errors from ``--evaluation``, command, commit), ``record.npz`` (every campaign label,
the flagged ones with ``info['quality_issues']``), ``README.md`` and, with ``--archive``, ``campaign.aiida``. The
model hyperparameters default to the ones the evaluation selected most often (``--evaluation``), else ``small`` /
600 epochs. The total size is checked against ``--max-mb`` (30).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hubbard_reference_aiida import train_with_aiida, write_archive  # noqa: E402
from hubbard_uv import ROOT, git_commit, load_labels  # noqa: E402
from hubbard_uv_trainer import SIZES  # noqa: E402

DEFAULT_OUT = ROOT / "aiida_eqml" / "ml" / "hubbard" / "reference" / "hubbard-tmo"


def training_config(args, size: str, epochs: int, n_samples: int, residual: bool = False,
                    v_sum_images: bool = False, spin_order: bool = False, u_sum_images: bool = False,
                    scf_inputs: bool = True) -> dict:
    """The config every member trains with (seed set per member); ``model`` is partial: ``prepare_hubbard_training``
    (train_cli) adds species, descriptor irreps and the U / V heads the record has labels for."""
    options = {k: True for k, on in (("residual", residual), ("v_sum_images", v_sum_images),
                                     ("u_sum_images", u_sum_images), ("spin_order", spin_order)) if on}
    if not scf_inputs:
        options["scf_inputs"] = False
    return {
        "model": {"cutoff": args.cutoff, **SIZES[size]},
        **({"hubbard": options} if options else {}),
        "epochs": int(epochs),
        "batch_size": min(args.batch_size, n_samples),
        "split": {
            "train": list(range(n_samples)),
            "val": [],
            "test": [],
        },  # every usable label: errors come from the LOMO evaluation
        "seed": args.seed,
        "optimizer": {
            "learning_rate": args.learning_rate,
            "schedule": "cosine",
            "decay_rate": 0.02,
            "warmup_epochs": min(10, int(epochs) // 10),
        },
        "early_stopping": {"patience": 0},
        "progress": False,
    }


def selected_hyperparameters(evaluation: dict | None, args) -> tuple[str, int, bool, str]:
    """``(size, epochs, residual, where from)``: the command line, else the candidate the evaluation's validation
    splits selected most often, else defaults."""
    residual = {"yes": True, "no": False}.get(args.residual)
    if args.size and args.epochs and residual is not None:
        return args.size, args.epochs, residual, "command line"
    if evaluation:
        votes = collections.Counter((e["selection"]["chosen"]["size"], e["selection"]["chosen"]["epochs"],
                                     bool(e["selection"]["chosen"].get("residual", False)))
                                    for e in evaluation.get("leave_one_material_out", []))
        if votes:
            (size, epochs, chosen_residual), _ = votes.most_common(1)[0]
            given = [name for name, value in (("size", args.size), ("epochs", args.epochs), ("residual", residual))
                     if value is not None]
            return (args.size or size, args.epochs or int(epochs), chosen_residual if residual is None else residual,
                    "most often selected in the evaluation" + (f"; {', '.join(given)} from the command line"
                                                               if given else ""))
    return args.size or "small", args.epochs or 600, bool(residual), "default"


def selected_option(evaluation: dict | None, args, key: str, default: bool = False) -> bool:
    """A yes/no candidate option (``v_sum_images``: V summed over periodic images; ``spin_order``: the local magnetic
    order in the site descriptor; ``scf_inputs``, default yes: U_scf / V_scf in the descriptors): the command line,
    else what the evaluation's validation splits selected most often, else ``default`` (what the models before the
    option did)."""
    given = getattr(args, key)
    if given is not None:
        return given == "yes"
    votes = collections.Counter(bool(e["selection"]["chosen"].get(key, default))
                                for e in (evaluation or {}).get("leave_one_material_out", []))
    return bool(votes.most_common(1)[0][0]) if votes else default


def train_in_process(record_path: Path, config: dict, seeds: list[int], work: Path) -> list[Path]:
    """One ``train_cli`` run per seed (what each ``eqml.train`` CalcJob of ``eqml.train.ensemble`` runs)."""
    from aiida_eqml.ml.train_cli import train_command

    files = []
    for seed in seeds:
        run = work / f"seed_{seed}"
        config_path = work / f"config_seed_{seed}.json"
        config_path.write_text(json.dumps({**config, "seed": seed}))
        t0 = time.time()
        code = train_command(record_path, config_path, run, progress=False)
        metrics = json.loads((run / "metrics.json").read_text())
        if code != 0:
            raise SystemExit(
                f"member seed {seed}: train_cli exit {code}: {metrics.get('status')}: {metrics.get('message')}"
            )
        print(f"  member seed {seed}: {metrics['epochs_run']} epochs in {time.time() - t0:.0f} s", flush=True)
        files.append(run / "model.eqml")
    return files


def errors_from_evaluation(path: Path, evaluation: dict, hold_out, materials) -> dict:
    """``metadata["errors"]``: the leave-one-material-out summary and per-material errors of ``evaluation``."""
    if sorted(set(evaluation.get("materials", [])) - set(hold_out)) != sorted(materials):
        print(f"warning: the evaluation's materials {evaluation.get('materials')} differ from the training "
              f"materials {materials}: rerun the evaluation on the same labels", file=sys.stderr)
    return {
        "source": os.path.relpath(path.resolve(), ROOT) if str(path.resolve()).startswith(str(ROOT)) else str(path),
        "command": evaluation.get("command"),
        "commit": evaluation.get("commit"),
        "summary": evaluation.get("summary"),
        "per_material": [
            {k: e.get(k) for k in ("material", "n_test", "mae_u", "mare_u", "mae_v", "mare_v")}
            for e in evaluation.get("leave_one_material_out", [])
        ],
    }


def refresh_errors(args) -> None:
    """``--errors-only``: replace ``metadata["errors"]`` of the ensemble in ``--out`` by those of ``--evaluation``
    (an evaluation finished after the members were trained, on the same labels), without retraining: the members and
    their sha256 stay as they are, so eqml.model nodes and ML loops made with them stay valid."""
    out = args.out.resolve()
    manifest = json.loads((out / "ensemble.json").read_text())
    meta = manifest["metadata"]
    meta["errors"] = errors_from_evaluation(args.evaluation, json.loads(args.evaluation.read_text()),
                                            meta.get("held_out_materials", []), meta["training_materials"])
    meta["errors_written_by"] = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "commit": git_commit(),
    }
    (out / "ensemble.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=float) + "\n")
    (out / "README.md").write_text(readme(meta, meta["name"]))
    print(f"{out / 'ensemble.json'}: errors from {meta['errors']['source']} (commit {meta['errors']['commit']})")


def readme(meta: dict, name: str) -> str:
    errors = meta.get("errors") or {}
    summary = errors.get("summary") or {}
    lines = [
        f"# Reference Hubbard model `{name}`",
        "",
        "Written by `benchmarks/hubbard_reference_model.py` (nothing here is edited by hand); load it with",
        f"`aiida_eqml.ml.hubbard.reference.load_reference_model({name!r})` or import it as `eqml.model` nodes with",
        f"`verdi data eqml model import-reference {name}`. See docs/hubbard.md, 'Reference data and model'.",
        "",
        f"* command: `{meta['command']}` at commit `{meta['commit']}`",
        f"* protocol: `{(meta.get('protocol') or {}).get('name')}` (fingerprint `{meta.get('protocol_fingerprint')}`);"
        " a model is only valid for labels at this protocol",
        f"* species: {', '.join(meta['species'])}; Hubbard manifolds l = {meta['hubbard']['manifold_ls']},"
        f" pair blocks {meta['hubbard']['pair_ls']}; heads {', '.join(meta['heads'])}",
        f"* training materials ({len(meta['training_materials'])}): {', '.join(meta['training_materials'])}",
        f"* labels: {meta['n_labels']['U']} U, {meta['n_labels']['V']} V from {meta['n_samples_trained']} hp.x runs;"
        f" {meta['n_flagged']} runs flagged by the quality filter (in record.npz, not trained on)",
        f"* members: {meta['members']} (seeds {meta['seeds']}), {meta['size']} model, {meta['epochs']} epochs"
        f" ({meta['hyperparameters_from']}), trained {meta['trained_with']}",
    ]
    if summary:
        lines.append(
            f"* measured errors (leave-one-material-out, {errors.get('source')}): MARE U {summary.get('mare_u')},"
            f" MARE V {summary.get('mare_v')}; best baseline U {summary.get('mare_u_best_baseline')},"
            f" V {summary.get('mare_v_best_baseline')}"
        )
    else:
        lines.append("* measured errors: none recorded (run benchmarks/hubbard_uv.py evaluate and pass --evaluation)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="+", default=None, help="npz files or directories (default: the campaign's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--name", default=None, help="reference name in the metadata (default: the --out directory name)"
    )
    parser.add_argument(
        "--evaluation", type=Path, default=None, help="hubbard_uv.json whose errors describe this model"
    )
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--residual", choices=("yes", "no"), default=None,
                        help="learn U - U_scf (default: what the evaluation selected)")
    parser.add_argument("--v-sum-images", choices=("yes", "no"), default=None,
                        help="V summed over each couple's periodic images (default: what the evaluation selected)")
    parser.add_argument("--u-sum-images", choices=("yes", "no"), default=None,
                        help="U plus the site's coupling to its own images (default: what the evaluation selected)")
    parser.add_argument("--spin-order", choices=("yes", "no"), default=None,
                        help="the local magnetic order in the site descriptor (default: what the evaluation selected)")
    parser.add_argument("--scf-inputs", choices=("yes", "no"), default=None,
                        help="U_scf / V_scf in the descriptors (default: what the evaluation selected, else yes)")
    parser.add_argument("--hold-out", nargs="+", default=[], metavar="MATERIAL",
                        help="materials left out of training (kept for benchmarks/ml_vs_dfpt.py: held-out materials)")
    parser.add_argument("--cutoff", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--min-gap", type=float, default=0.0, help="quality filter: band gap (eV) per spin channel")
    parser.add_argument("--profile", default=None, help="run eqml.train.ensemble in this AiiDA profile")
    parser.add_argument("--computer", default="localhost", help="with --profile: computer of the training jobs")
    parser.add_argument("--archive", action="store_true", help="with --profile: also write campaign.aiida")
    parser.add_argument("--archive-only", action="store_true",
                        help="with --profile: only (re)write campaign.aiida of the ensemble in --out, no training "
                             "(stop the daemon and other writers first: the archive reads the live profile)")
    parser.add_argument("--errors-only", action="store_true",
                        help="with --evaluation: only rewrite the measured errors in --out, no training")
    parser.add_argument("--max-mb", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.errors_only:
        if not args.evaluation:
            parser.error("--errors-only needs --evaluation")
        refresh_errors(args)
        return
    if (args.archive or args.archive_only) and not args.profile:
        parser.error("--archive / --archive-only need --profile")
    if args.archive_only:
        out = args.out.resolve()
        meta = json.loads((out / "ensemble.json").read_text())["metadata"]
        training = (meta.get("aiida") or {}).get("workchain_uuid")
        previous = None
        if (out / "campaign.aiida").exists():  # its cells are imported into the new archive, which replaces it
            previous = Path(tempfile.mkdtemp(prefix="hubbard-archive-")) / "campaign.aiida"
            shutil.copyfile(out / "campaign.aiida", previous)
        path = write_archive(args, out, [training] if training else [], previous=previous)
        if previous is not None:
            shutil.rmtree(previous.parent)
        total = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        if total > args.max_mb:
            raise SystemExit(f"{out}: {total:.1f} MB, above --max-mb {args.max_mb}")
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB; {out} {total:.1f} MB in all)")
        return

    from aiida_eqml.ml.dataset import Dataset
    from aiida_eqml.ml.hubbard.evaluation import label_flags, label_table, material_of
    from aiida_eqml.ml.hubbard.protocol import protocol_fingerprint, record_protocol
    from aiida_eqml.ml.hubbard.reference import reference_metadata  # noqa: F401  (the loader this feeds)
    from aiida_eqml.ml.modelfile import file_sha256, load_model

    # the code that trains, taken before this script writes its output into the package (which would read as dirty)
    commit = git_commit()
    record, files = load_labels(args.labels)
    flags = label_flags(record, min_gap_ev=args.min_gap)
    for index, issues in flags.items():
        record.samples[index].info["quality_issues"] = list(issues)
    unknown = sorted(set(args.hold_out) - {material_of(s) for s in record.samples})
    if unknown:
        raise SystemExit(f"--hold-out: no labels of {unknown} in the record")
    usable = [i for i in range(len(record)) if i not in flags and material_of(record.samples[i]) not in args.hold_out]
    if not usable:
        raise SystemExit("every label is flagged by the quality filter: nothing to train on")
    train_record = record.subset(usable)
    protocol = record_protocol(train_record)
    rows = label_table(record, usable)
    materials = sorted({material_of(record.samples[i]) for i in usable})
    evaluation = json.loads(args.evaluation.read_text()) if args.evaluation else None
    size, epochs, residual, source = selected_hyperparameters(evaluation, args)
    v_sum_images = selected_option(evaluation, args, "v_sum_images")
    spin_order = selected_option(evaluation, args, "spin_order")
    u_sum_images = selected_option(evaluation, args, "u_sum_images")
    scf_inputs = selected_option(evaluation, args, "scf_inputs", default=True)
    seeds = [args.seed + k for k in range(args.members)]
    config = training_config(args, size, epochs, len(train_record), residual, v_sum_images, spin_order, u_sum_images,
                             scf_inputs)
    print(
        f"{len(record)} labels from {len(files)} files, {len(flags)} flagged; training on {len(usable)} "
        f"({sum(r['kind'] == 'U' for r in rows)} U, {sum(r['kind'] == 'V' for r in rows)} V) of {len(materials)} "
        f"materials; {args.members} x {size}/{epochs} epochs, residual {residual} ({source}), V summed over images "
        f"{v_sum_images}, U summed over images {u_sum_images}, spin order {spin_order}, scf inputs {scf_inputs}; "
        f"held out {args.hold_out}",
        flush=True,
    )

    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="hubbard-reference-") as scratch:
        work = Path(scratch)
        record_path = work / "train.npz"
        train_record.save(record_path)
        t0 = time.time()
        if args.profile:
            member_files, aiida_info = train_with_aiida(args, train_record, config, seeds, work)
            trained_with = "eqml.train.ensemble (EqmlEnsembleTrainWorkChain) in AiiDA"
        else:
            member_files, aiida_info = train_in_process(record_path, config, seeds, work), None
            trained_with = "in-process aiida_eqml.ml.train_cli, one run per seed (the eqml.train CalcJob's run)"
        seconds = time.time() - t0

        metas = [load_model(f)[2] for f in member_files]
        configs = [load_model(f)[0].config for f in member_files]
        for f, m in zip(member_files, metas):
            if "hubbard" not in m:
                raise SystemExit(f"{f}: the model metadata lacks the 'hubbard' descriptor slots")
            if protocol is not None and m.get("protocol") is None:
                raise SystemExit(f"{f}: the model metadata lacks the labels' protocol")

        archive = out / "campaign.aiida"
        kept_archive = None
        if archive.exists():  # the campaign's provenance: kept, or with --archive imported into the new one
            kept_archive = Path(tempfile.mkdtemp(prefix="hubbard-archive-")) / archive.name
            shutil.move(archive, kept_archive)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if kept_archive is not None and not args.archive:
            shutil.move(kept_archive, archive)
        entries = []
        for k, (f, seed) in enumerate(zip(member_files, seeds)):
            name = f"member_{k:02d}.eqml"
            shutil.copyfile(f, out / name)
            entries.append({"file": name, "sha256": file_sha256(out / name), "seed": seed})
        for index in range(len(record)):  # the shipped record: compact, every label, flags in info
            record.samples[index].info.setdefault("quality_issues", [])
        record.save(out / "record.npz")

    name = args.name or out.name
    meta = {
        "name": name,
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "commit": commit,
        "protocol": protocol,
        "protocol_fingerprint": protocol_fingerprint(protocol) if protocol else None,
        "species": list(configs[0]["species"]),
        "heads": sorted(configs[0]["heads"]),
        "hubbard": metas[0]["hubbard"],
        "training_materials": materials,
        "held_out_materials": sorted(args.hold_out),
        "n_labels": {"U": sum(r["kind"] == "U" for r in rows), "V": sum(r["kind"] == "V" for r in rows)},
        "n_samples_trained": len(usable),
        "n_flagged": len(flags),
        "flagged": {record.samples[i].info.get("name", str(i)): issues for i, issues in flags.items()},
        "label_files": [os.path.relpath(f, ROOT) if str(f).startswith(str(ROOT)) else str(f) for f in files],
        "record": "record.npz",
        "members": args.members,
        "seeds": seeds,
        "size": size,
        "epochs": epochs,
        "residual": residual,
        "v_sum_images": v_sum_images,
        "spin_order": spin_order,
        "scf_inputs": scf_inputs,
        "u_sum_images": u_sum_images,
        "hyperparameters_from": source,
        "training_config": config,
        "trained_with": trained_with,
        "aiida": aiida_info,
        "train_seconds": seconds,
        "train_metrics": [m.get("metrics", {}).get("train") for m in metas],
        "errors": None,
    }
    if evaluation:
        meta["errors"] = errors_from_evaluation(args.evaluation, evaluation, args.hold_out, materials)
    manifest = {"format": "aiida-eqml-ensemble", "format_version": 1, "members": entries, "metadata": meta}
    (out / "ensemble.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=float) + "\n")
    if args.archive:
        write_archive(args, out, [aiida_info["workchain_uuid"]] if aiida_info else [], previous=kept_archive)
    if kept_archive is not None:
        shutil.rmtree(kept_archive.parent, ignore_errors=True)
    (out / "README.md").write_text(readme(meta, name))

    # Checks: loads as an ensemble, predicts the shipped record, fits the size budget.
    from aiida_eqml.ml.hubbard.ensemble import Ensemble

    ensemble = Ensemble.load(out)
    predictions = ensemble.predict(Dataset.load(out / "record.npz").subset(usable[:2]))
    total = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(
        f"wrote {out}: {len(entries)} members, {total:.2f} MB; first sample U = "
        f"{np.round(predictions[0]['hubbard_u'][0], 3).tolist()} "
        f"+- {np.round(predictions[0]['hubbard_u'][1], 3).tolist()}"
    )
    if total > args.max_mb:
        raise SystemExit(f"{out} is {total:.1f} MB, over the {args.max_mb} MB budget")


if __name__ == "__main__":
    main()
