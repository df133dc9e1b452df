"""Anderson acceleration of the U/V fixed-point iteration (aiida_eqml.workflows.hubbard.mixing): on maps with a
known fixed point it lands there in fewer evaluations than plain iteration, its steps are bounded, and the
calcfunction builds the next input structure with provenance."""
from __future__ import annotations

import numpy as np
import pytest

from aiida_eqml.workflows.hubbard.mixing import MAX_STEP_EV, MAX_STEP_RESIDUALS, anderson_next


def iterate(f, x0, depth, tolerance=1e-6, max_evaluations=400):
    """Evaluations of ``f`` until |f(x) - x| < tolerance (inf-norm), with Anderson mixing of this depth."""
    inputs, outputs = [], []
    x = np.asarray(x0, dtype=float)
    for evaluation in range(1, max_evaluations + 1):
        fx = f(x)
        inputs, outputs = [*inputs, x][-(depth + 1):], [*outputs, fx][-(depth + 1):]
        if np.max(np.abs(fx - x)) < tolerance:
            return evaluation, fx
        x = anderson_next(inputs, outputs, depth)
    raise AssertionError(f'no convergence in {max_evaluations} evaluations')


def test_secant_step_lands_on_the_fixed_point_of_a_linear_map():
    f = lambda x: 0.5 * x + 2.0  # noqa: E731 - fixed point 4, contraction 0.5 (the Sr3Ti2O7 loop's rate)
    assert anderson_next([[0.0], [2.0]], [[2.0], [3.0]], depth=1) == pytest.approx([4.0], abs=1e-12)
    plain, _ = iterate(f, [0.0], depth=0)
    mixed, fixed = iterate(f, [0.0], depth=1)
    assert mixed == 3 and plain > 20 and fixed == pytest.approx([4.0], abs=1e-6)


def test_coupled_parameters_converge_faster_with_depth_two():
    a = np.array([[0.6, 0.2], [0.1, 0.8]])  # U and V coupled, slowest rate about 0.87
    b = np.array([1.5, 0.3])
    fixed = np.linalg.solve(np.eye(2) - a, b)
    plain, _ = iterate(lambda x: a @ x + b, fixed + [0.4, -0.3], depth=0)
    mixed, result = iterate(lambda x: a @ x + b, fixed + [0.4, -0.3], depth=2)
    assert mixed <= 5 < plain and result == pytest.approx(fixed, abs=1e-5)


def test_steps_are_bounded_and_u_stays_non_negative():
    # near-identical residuals (noise) make the secant step enormous: it is capped at 10x the last residual
    step = anderson_next([[5.0], [5.1]], [[5.01], [5.1100001]], depth=1) - 5.1100001
    assert abs(step[0]) == pytest.approx(MAX_STEP_RESIDUALS * 0.0100001, rel=1e-6)
    # and at MAX_STEP_EV however large the residual
    big = anderson_next([[0.0], [3.0]], [[3.0], [5.9]], depth=1) - 5.9
    assert abs(big[0]) == pytest.approx(MAX_STEP_EV)
    assert anderson_next([[1.0], [0.5]], [[0.5], [0.1]], depth=1, lower=[0.0])[0] == 0.0
    assert anderson_next([[1.0]], [[0.7]], depth=3) == pytest.approx([0.7])  # one point: plain iteration
    assert anderson_next([[1.0], [0.7]], [[0.7], [0.6]], depth=0) == pytest.approx([0.6])
    with pytest.raises(ValueError, match='must be'):
        anderson_next([[1.0, 2.0]], [[1.0]], depth=1)


def test_anderson_mixed_builds_the_next_structure_with_provenance(aiida_profile):
    from aiida import orm
    from aiida_quantumespresso.data.hubbard_structure import HubbardStructureData

    from aiida_eqml.workflows.hubbard.mixing import anderson_mixed

    def structure(u_ni, v):
        node = HubbardStructureData(cell=[[4.2, 0, 0], [0, 4.2, 0], [0, 0, 4.2]], sites=[
            ('Ni', 'Ni', (0.0, 0.0, 0.0)), ('O', 'O', (2.1, 0.0, 0.0))])
        node.initialize_onsites_hubbard('Ni', '3d', u_ni, 'U', use_kinds=True)
        node.initialize_intersites_hubbard('Ni', '3d', 'O', '2p', v, 'V', use_kinds=True)
        return node.store()

    iterates = {'input_00': structure(5.0, 0.5), 'output_00': structure(6.0, 0.7),
                'input_01': structure(6.0, 0.7), 'output_01': structure(6.5, 0.8)}
    mixed = anderson_mixed(orm.Int(1), **iterates)
    values = sorted(float(p.value) for p in mixed.hubbard.parameters)
    # U: secant of (5 -> 6, 6 -> 6.5) = 7; V (0.5 -> 0.7, 0.7 -> 0.8) = 0.9, one least-squares gamma for both
    assert values[-1] > 6.5 and values[0] > 0.8
    assert set(np.round(values, 9)) == {0.9, 7.0}  # both residual series halve: gamma = -1 fits them exactly
    assert mixed.creator.process_label == 'anderson_mixed'
    assert {link.link_label for link in mixed.creator.base.links.get_incoming().all()} >= set(iterates)
    assert len(mixed.hubbard.parameters) == len(iterates['output_01'].hubbard.parameters)
