"""Numbers the ML loop cannot work with are refused by their port, with the port and the value, before anything is
stored; the CLI refuses them as option errors."""
import pytest
from test_ml_hubbard_loop import loop_builder, loop_structure, untrained_models  # noqa: F401 (fixtures)


def assert_refused(builder, phrase, **inputs):
    """Launching ``builder`` (with ``inputs`` replacing its own, as a user of ``run(Cls, **inputs)`` would) fails."""
    from aiida import orm
    from aiida.engine import run_get_node

    before = orm.QueryBuilder().append(orm.Node).count()
    with pytest.raises(ValueError) as info:
        run_get_node(builder.process_class, **{**builder._inputs(prune=True), **inputs})
    assert phrase in str(info.value), str(info.value)
    assert orm.QueryBuilder().append(orm.Node).count() == before  # nothing stored, nothing ran


@pytest.mark.parametrize('port, value, phrase', [
    ('max_iterations', 0, '`max_iterations` must be >= 1, got 0'),
    ('tolerance_onsite', -0.1, '`tolerance_onsite` must be >= 0, got -0.1'),
    ('tolerance_intersite', -0.01, '`tolerance_intersite` must be >= 0, got -0.01'),
    ('uncertainty_threshold', -1.0, '`uncertainty_threshold` must be >= 0, got -1.0'),
    ('anderson_depth', -1, '`anderson_depth` must be >= 0, got -1'),
    ('relax_frequency', 0, '`relax_frequency` must be >= 1, got 0'),
    ('skip_relax_iterations', -2, '`skip_relax_iterations` must be >= 0, got -2'),
])
def test_out_of_range_numbers_are_refused_by_their_port(
    aiida_profile, qe_codes, pseudo_family, untrained_models, loop_structure, port, value, phrase  # noqa: F811
):
    from aiida import orm

    builder = loop_builder(qe_codes, loop_structure, untrained_models, hp=True)
    node = orm.Int(value) if isinstance(value, int) else orm.Float(value)
    with pytest.raises(ValueError, match=phrase.replace('.', r'\.')):  # the builder checks on assignment ...
        builder[port] = node
    assert_refused(builder, phrase, **{port: node})  # ... and the process when launched from plain inputs


def test_negative_or_missing_starting_u_is_refused(
    aiida_profile, qe_codes, pseudo_family, untrained_models, loop_structure  # noqa: F811
):
    negative = loop_structure.clone()
    negative.clear_hubbard_parameters()
    negative.initialize_onsites_hubbard('Ni1', '3d', -3.0, 'Ueff', use_kinds=True)
    negative.initialize_onsites_hubbard('Ni2', '3d', 5.0, 'Ueff', use_kinds=True)
    builder = loop_builder(qe_codes, loop_structure, untrained_models, hp=False)
    assert_refused(builder, 'U(Ni1 3d) on site 0 is -3.0 eV; a starting U must be >= 0', hubbard_structure=negative)

    bare = loop_structure.clone()
    bare.clear_hubbard_parameters()
    assert_refused(builder, '`hubbard_structure` has no Hubbard parameters', hubbard_structure=bare)


@pytest.mark.parametrize('option, value', [('--u-start', '-3'), ('--max-iterations', '0'),
                                           ('--uncertainty-threshold', '-1')])
def test_cli_refuses_out_of_range_options(aiida_profile, tmp_path, option, value):
    import ase.io
    from aiida import orm
    from click.testing import CliRunner

    from aiida_eqml.cli.main import cli
    from aiida_eqml.local.hubbard_materials import hubbard_structure

    path = tmp_path / 'NiO.extxyz'
    ase.io.write(path, hubbard_structure('NiO-rocksalt-afm2').get_ase())
    before = orm.QueryBuilder().append(orm.Node).count()
    result = CliRunner().invoke(cli, ['hubbard', 'run', str(path), option, value, '--no-hp',
                                      '--profile', aiida_profile.name])
    assert result.exit_code == 2, result.output  # click's usage error
    assert option in result.output and value in result.output, result.output
    assert orm.QueryBuilder().append(orm.Node).count() == before


def test_cli_structures_start_from_the_label_campaigns_seeds(aiida_profile):
    """``aiida-eqml hubbard run`` without ``--u-start`` seeds each element's U as the reference labels were seeded
    (Ti 3 eV, Mn-Ni 5 eV: the shipped model's first prediction then reads a ground state like its training ones),
    V at V_START on one TM-O couple per kind; ``--u-start`` sets every site."""
    from pathlib import Path

    from aiida_eqml.cli.hubbard import build_structure
    from aiida_eqml.local.hubbard_materials import U_START_3D, V_START

    examples = Path(__file__).resolve().parents[2] / 'examples' / 'structures'
    titanate = build_structure(str(examples / 'SrTiO3_perovskite.extxyz'), (), None, True).hubbard.to_list()
    assert [p[4] for p in titanate if p[6] == 'U'] == [U_START_3D['Ti']] == [3.0]
    assert [(p[1], p[3], p[4]) for p in titanate if p[6] == 'V'] == [('3d', '2p', V_START)]
    cobalt = build_structure(str(examples / 'CoO_afm2.extxyz'), (), None, False).hubbard.to_list()
    assert [p[4] for p in cobalt] == [5.0, 5.0] and not any(p[6] == 'V' for p in cobalt)
    given = build_structure(str(examples / 'CoO_afm2.extxyz'), (), 4.2, False).hubbard.to_list()
    assert [p[4] for p in given] == [4.2, 4.2]
