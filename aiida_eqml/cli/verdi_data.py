"""``verdi data eqml dataset|model list|show|export`` (entry point ``aiida.cmdline.data: eqml``)."""
from __future__ import annotations

import json
import pathlib

import click
from aiida.cmdline.commands.cmd_data import verdi_data
from aiida.cmdline.utils import decorators, echo

__all__ = ('data_eqml',)


def _table(rows: list[list], headers: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers)


def _short_list(values, limit: int = 6) -> str:
    values = list(values or [])
    text = ','.join(str(v) for v in values[:limit])
    return text + (f',...(+{len(values) - limit})' if len(values) > limit else '')


def _creator_label(node) -> str:
    creator = node.creator
    return f'{creator.process_label}<{creator.pk}>' if creator is not None else '-'


def _query(
    cls, species: tuple[str, ...], targets: tuple[str, ...], limit: int | None, species_key: str, targets_key: str
):
    from aiida import orm

    filters = {}
    if species:
        filters[f'attributes.{species_key}'] = {'contains': list(species)}
    if targets:
        filters[f'attributes.{targets_key}'] = {'contains': list(targets)}
    query = orm.QueryBuilder().append(cls, filters=filters, tag='node', project='*')
    query.order_by({'node': {'ctime': 'desc'}})
    if limit:
        query.limit(limit)
    return list(reversed(query.all(flat=True)))  # newest `limit`, oldest first like `verdi data ... list`


@verdi_data.group('eqml')
def data_eqml():
    """Inspect and export aiida-eqml datasets and models."""


# ====================================================================== datasets
@data_eqml.group('dataset')
def dataset():
    """Training datasets (`eqml.dataset` nodes)."""


@dataset.command('list')
@click.option('-s', '--species', multiple=True, help='Only datasets containing this element (repeatable).')
@click.option('-t', '--target', 'targets', multiple=True, help='Only datasets with this target (repeatable).')
@click.option('-l', '--limit', type=int, default=None, help='Only the newest LIMIT datasets.')
@decorators.with_dbenv()
def dataset_list(species, targets, limit):
    """List datasets: size, species, targets and the process that made each."""
    from aiida_eqml.data.dataset import EqmlDatasetData

    nodes = _query(EqmlDatasetData, species, targets, limit, 'species', 'target_names')
    if not nodes:
        echo.echo_report('no eqml.dataset nodes found')
        return
    rows = [
        [
            n.pk,
            n.ctime.strftime('%Y-%m-%d %H:%M'),
            n.n_samples,
            n.n_atoms,
            _short_list(n.species),
            _short_list(n.target_names),
            _creator_label(n),
            n.sha256[:12],
        ]
        for n in nodes
    ]
    echo.echo(_table(rows, ['PK', 'Created', 'Samples', 'Atoms', 'Species', 'Targets', 'Creator', 'sha256']))


@dataset.command('show')
@click.argument('identifier')
@decorators.with_dbenv()
def dataset_show(identifier):
    """Attributes, target specs and provenance of one dataset (PK, UUID or label)."""
    from aiida_eqml.data.dataset import load_dataset_node

    try:
        node = load_dataset_node(identifier)
    except ValueError as exception:
        echo.echo_critical(str(exception))
    attributes = node.base.attributes.all
    lines = [
        ('PK / UUID', f'{node.pk} / {node.uuid}'),
        ('Created', node.ctime.isoformat(timespec='seconds')),
        ('Samples / atoms', f'{node.n_samples} / {node.n_atoms}'),
        ('Species', ', '.join(node.species)),
        ('Schema version', attributes.get('schema_version')),
        ('Content sha256', node.sha256),
        ('Created by', _creator_label(node)),
    ]
    echo.echo(_table([list(line) for line in lines], ['Property', 'Value']))
    echo.echo('')
    rows = [
        [name, spec.get('level'), spec.get('tensor', spec.get('irreps')), spec.get('unit', '')]
        for name, spec in sorted(node.target_specs.items())
    ]
    echo.echo(_table(rows, ['Target', 'Level', 'Tensor / irreps', 'Unit']))
    models = _models_trained_on(node)
    if models:
        echo.echo('')
        echo.echo(f'Models trained on it: {", ".join(str(pk) for pk in models)}')


def _models_trained_on(dataset_node) -> list[int]:
    from aiida import orm

    from aiida_eqml.data.dataset import EqmlDatasetData
    from aiida_eqml.data.model import EqmlModelData

    query = orm.QueryBuilder().append(EqmlDatasetData, filters={'id': dataset_node.pk}, tag='dataset')
    query.append(orm.CalcJobNode, with_incoming='dataset', tag='calc')
    query.append(EqmlModelData, with_incoming='calc', project='id')
    return sorted(set(query.all(flat=True)))


@dataset.command('export')
@click.argument('identifier')
@click.argument('output', type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option(
    '-F', '--format', 'fmt', type=click.Choice(['npz', 'extxyz']), default=None,
    help='npz: the stored file byte for byte; extxyz: structures with labels. Default: from the file suffix.',
)
@click.option('-f', '--force', is_flag=True, help='Overwrite OUTPUT if it exists.')
@decorators.with_dbenv()
def dataset_export(identifier, output, fmt, force):
    """Write a dataset to OUTPUT (.npz or .extxyz)."""
    from aiida_eqml.data.dataset import load_dataset_node

    try:
        node = load_dataset_node(identifier)
    except ValueError as exception:
        echo.echo_critical(str(exception))
    fmt = fmt or ('extxyz' if output.suffix in ('.xyz', '.extxyz') else 'npz')
    if output.exists() and not force:
        echo.echo_critical(f'{output} exists; use --force to overwrite')
    if fmt == 'npz':
        node.export_npz(output)
    else:
        node.export_extxyz(output)
    echo.echo_success(f'dataset {node.pk} ({node.n_samples} samples) written to {output} ({fmt})')


# ====================================================================== models
@data_eqml.group('model')
def model():
    """Trained models (`eqml.model` nodes)."""


def _test_summary(node) -> str:
    parts = []
    for target, values in sorted((node.test_metrics or {}).items()):
        mae = values.get('mae') if isinstance(values, dict) else None
        if mae is not None:
            parts.append(f'{target}={mae:.3g}')
    return ' '.join(parts) or '-'


@model.command('list')
@click.option('-s', '--species', multiple=True, help='Only models trained on this element (repeatable).')
@click.option('-t', '--target', 'targets', multiple=True, help='Only models predicting this target (repeatable).')
@click.option('-l', '--limit', type=int, default=None, help='Only the newest LIMIT models.')
@decorators.with_dbenv()
def model_list(species, targets, limit):
    """List models: architecture, species, targets, test MAE and the process that made each."""
    from aiida_eqml.data.model import EqmlModelData

    nodes = _query(EqmlModelData, species, targets, limit, 'species', 'targets')
    if not nodes:
        echo.echo_report('no eqml.model nodes found')
        return
    rows = [
        [
            n.pk,
            n.ctime.strftime('%Y-%m-%d %H:%M'),
            n.architecture,
            _short_list(n.species),
            _short_list(n.targets),
            _test_summary(n),
            _creator_label(n),
            n.sha256[:12],
        ]
        for n in nodes
    ]
    echo.echo(_table(rows, ['PK', 'Created', 'Arch', 'Species', 'Targets', 'Test MAE', 'Creator', 'sha256']))


@model.command('show')
@click.argument('identifier')
@click.option('--metrics', 'show_metrics', is_flag=True, help='Also print every metric (all splits) as JSON.')
@decorators.with_dbenv()
def model_show(identifier, show_metrics):
    """Attributes, heads, test metrics and provenance (training job, datasets) of one model."""
    from aiida_eqml.data.model import load_model_node

    try:
        node = load_model_node(identifier)
    except ValueError as exception:
        echo.echo_critical(str(exception))
    attributes = node.base.attributes.all
    datasets = _training_datasets(node)
    lines = [
        ('PK / UUID', f'{node.pk} / {node.uuid}'),
        ('Created', node.ctime.isoformat(timespec='seconds')),
        ('Architecture', node.architecture),
        ('Species', ', '.join(node.species)),
        ('Cutoff (Angstrom)', node.cutoff),
        ('Best epoch / epochs run', f'{attributes.get("best_epoch")} / {attributes.get("epochs_run")}'),
        ('File sha256', node.sha256),
        ('Content sha256', node.content_sha256),
        ('Created by', _creator_label(node)),
        ('Training datasets', ', '.join(f'{pk} ({n} samples)' for pk, n in datasets) or '-'),
    ]
    echo.echo(_table([list(line) for line in lines], ['Property', 'Value']))
    echo.echo('')
    rows = []
    for name, head in sorted((node.heads or {}).items()):
        spec = (node.target_specs or {}).get(name, {})
        metrics = (node.test_metrics or {}).get(name, {})
        rows.append(
            [
                name,
                head.get('level'),
                spec.get('tensor', head.get('irreps')),
                spec.get('unit', ''),
                metrics.get('mae', '-'),
                metrics.get('rmse', '-'),
            ]
        )
    echo.echo(_table(rows, ['Head', 'Level', 'Tensor / irreps', 'Unit', 'Test MAE', 'Test RMSE']))
    if show_metrics:
        echo.echo('')
        echo.echo(json.dumps(attributes.get('metrics') or {}, indent=1, sort_keys=True))


def _training_datasets(model_node) -> list[tuple[int, int]]:
    creator = model_node.creator
    if creator is None:
        return []
    from aiida_eqml.data.dataset import EqmlDatasetData

    inputs = creator.base.links.get_incoming(node_class=EqmlDatasetData).all_nodes()
    return sorted((node.pk, node.n_samples) for node in inputs)


@model.command('export')
@click.argument('identifier')
@click.argument('output', type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option('-f', '--force', is_flag=True, help='Overwrite OUTPUT if it exists.')
@decorators.with_dbenv()
def model_export(identifier, output, force):
    """Write the model file to OUTPUT (byte-identical: same sha256), loadable with
    aiida_eqml.ml.modelfile.load_model."""
    from aiida_eqml.data.model import load_model_node
    from aiida_eqml.ml.modelfile import file_sha256

    try:
        node = load_model_node(identifier)
    except ValueError as exception:
        echo.echo_critical(str(exception))
    if output.exists() and not force:
        echo.echo_critical(f'{output} exists; use --force to overwrite')
    node.export(output)
    digest = file_sha256(output)
    if digest != node.sha256:
        echo.echo_critical(
            f'{output}: sha256 {digest} differs from the node\'s {node.sha256}: the repository copy is corrupt'
        )
    echo.echo_success(f'model {node.pk} written to {output} (sha256 {digest})')


@model.command('import-reference')
@click.argument('name', required=False)
@click.option('--list', 'list_only', is_flag=True, help='List the reference models of this installation and exit.')
@decorators.with_dbenv()
def model_import_reference(name, list_only):
    """Store the members of the shipped reference ensemble NAME (e.g. hubbard-tmo) as eqml.model nodes.

    Idempotent: a member already stored (same file sha256) is reused, not duplicated. Each node gets the extra
    ``eqml_reference`` (name, member, protocol, training materials, measured errors)."""
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.hubbard.reference import (
        REFERENCE_MODELS,
        available_reference_models,
        reference_member_files,
        reference_metadata,
    )

    if list_only or not name:
        available = set(available_reference_models())
        rows = [[n, 'yes' if n in available else 'no (not built yet)', REFERENCE_MODELS.get(n, '')]
                for n in sorted(set(REFERENCE_MODELS) | available)]
        echo.echo(_table(rows, ['Name', 'Data present', 'Description']))
        return
    try:
        files = reference_member_files(name)
        metadata = reference_metadata(name)
    except (ValueError, FileNotFoundError) as exception:
        echo.echo_critical(str(exception))
    summary = {key: metadata.get(key) for key in ('protocol_fingerprint', 'training_materials', 'species', 'commit')}
    summary['protocol_name'] = (metadata.get('protocol') or {}).get('name')
    summary['errors'] = (metadata.get('errors') or {}).get('summary')
    pks = []
    for index, path in enumerate(files):
        node = EqmlModelData.get_or_create(path)
        node.base.extras.set('eqml_reference', {'name': name, 'member': index, 'file': path.name, **summary})
        pks.append(node.pk)
        echo.echo(f'{name} {path.name}: eqml.model {node.pk} (sha256 {node.sha256[:12]})')
    echo.echo_success(
        f'reference model {name}: {len(pks)} members as eqml.model nodes {" ".join(str(pk) for pk in pks)}'
    )
