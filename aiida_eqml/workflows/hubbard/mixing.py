"""Anderson acceleration of the loop's fixed-point iteration x -> f(x) (x: the U / V the scf used, f(x): the
values predicted, or computed by hp.x, at that scf's ground state).

Why: plain iteration (aiida-hubbard's, ``anderson_depth = 0``) converges linearly; on the 12-atom Sr3Ti2O7 the ML
loop took 6 iterations with U(Ti 3d) = 3.83, 4.03, 4.13, 4.18, 4.20, 4.22 eV, each change about half the last
(docs/hubbard_loop.md), i.e. a contraction rate near 0.5. Anderson mixing (Anderson 1965; Walker & Ni, SIAM J.
Numer. Anal. 49, 1715 (2011), "type II" with mixing parameter 1) extrapolates from the last ``depth`` residuals; on
a linear map one step with depth 1 lands on the fixed point. The fixed point, and the convergence test on
|f(x) - x| per parameter, are those of plain iteration: only the inputs of the next scf differ, and the converged
output is f(x) as without mixing.

:func:`anderson_next` is pure NumPy; :func:`anderson_mixed` is the calcfunction that makes the next input
structure (so that every U / V a pw.x run uses has provenance).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_eqml.workflows.hubbard.domain import is_onsite, parameter_key, parameter_values

__all__ = ('anderson_next', 'anderson_mixed', 'MAX_STEP_EV', 'MAX_STEP_RESIDUALS')

#: The extrapolation beyond f(x) is capped at this many eV per parameter and at this many times the largest
#: residual |f(x) - x|: near convergence the residual differences are small and noisy (scf thresholds, float32 model
#: outputs), and an unbounded secant step could send the next scf far from the fixed point. The exact step on a
#: linear map of contraction rate a is a / (1 - a) residuals: 10 allows rates up to 0.9.
MAX_STEP_EV = 1.0
MAX_STEP_RESIDUALS = 10.0


def anderson_next(inputs: Sequence[Sequence[float]], outputs: Sequence[Sequence[float]], depth: int,
                  lower: Sequence[float] | None = None) -> np.ndarray:
    """The next input of the map from its history: ``inputs[k]`` was mapped to ``outputs[k]`` (same parameter
    order in every row, oldest first). Uses the last ``depth`` differences; with no difference yet (one point) or
    ``depth`` 0, it is the last output (plain iteration). ``lower``: per-parameter lower bounds (U >= 0)."""
    x = np.asarray(inputs, dtype=float)
    f = np.asarray(outputs, dtype=float)
    if x.shape != f.shape or x.ndim != 2:
        raise ValueError(f'inputs {x.shape} and outputs {f.shape} must be (iterations, parameters) of one shape')
    m = min(int(depth), len(x) - 1)
    if m < 1:
        return f[-1].copy()
    residuals = f - x
    d_residuals = (residuals[-m:] - residuals[-m - 1:-1]).T  # (parameters, m)
    d_outputs = (f[-m:] - f[-m - 1:-1]).T
    gamma, *_ = np.linalg.lstsq(d_residuals, residuals[-1], rcond=1e-10)
    step = -d_outputs @ gamma
    limit = min(MAX_STEP_EV, MAX_STEP_RESIDUALS * float(np.max(np.abs(residuals[-1]))))
    largest = float(np.max(np.abs(step))) if step.size else 0.0
    if largest > limit:
        step *= limit / largest
    result = f[-1] + step
    if lower is not None:
        result = np.maximum(result, np.asarray(lower, dtype=float))
    return result


def parameter_vector(hubbard_structure, keys: Sequence[tuple]) -> list[float]:
    """The values of ``keys`` in a HubbardStructureData, in that order (the caller passes iterates that all have
    these parameters: ``steps.next_input`` restarts the history when the set changes)."""
    values = parameter_values(hubbard_structure.hubbard.parameters)
    return [values[key] for key in keys]


@calcfunction
def anderson_mixed(depth: orm.Int, **iterates):
    """The next input structure: the last output (``output_NN`` with the largest NN) with every U / V replaced by
    the Anderson extrapolation over the pairs ``input_NN`` -> ``output_NN`` (HubbardStructureData; the caller passes
    only iterates with the same parameters)."""
    count = len(iterates) // 2
    pairs = [(iterates[f'input_{n:02d}'], iterates[f'output_{n:02d}']) for n in range(count)]
    last = pairs[-1][1]
    keys = [parameter_key(p) for p in last.hubbard.parameters]
    inputs = [parameter_vector(structure, keys) for structure, _ in pairs]
    outputs = [parameter_vector(structure, keys) for _, structure in pairs]
    lower = [0.0 if is_onsite(key) else -np.inf for key in keys]
    values = anderson_next(inputs, outputs, depth.value, lower=lower)
    hubbard = last.hubbard
    for parameter, value in zip(hubbard.parameters, values):
        parameter.value = float(value)
    result = last.clone()
    result.hubbard = hubbard
    return result
