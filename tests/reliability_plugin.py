"""Rows of docs/reliability.md, recorded by the tests that try malformed input on an entry point.

A test takes the ``reliability`` fixture and records what it observed::

    def test_nan_cell(reliability):
        error = reliability.raises('graph_from_atoms (ML API)', 'NaN in the cell', StructureError,
                                   graph_from_atoms, atoms, 3.0, ['O'])
        assert 'cell' in str(error)

or ``reliability.record(entry_point, malformed_input, observed)`` with an observed-behaviour text the test built from
what actually happened (an exit code, a process state...). ``pytest --reliability-json=PATH`` writes the rows of the
tests that ran (and passed: a failing test's row is not evidence) to PATH; ``scripts/reliability_table.py`` runs the
tests that way and turns the JSON into the markdown table. Without the option nothing is written.
"""
from __future__ import annotations

import json
import re

import pytest

_ROWS: list[dict] = []
_MAX_OBSERVED = 220


def pytest_addoption(parser):
    parser.addoption('--reliability-json', default=None, help='write the reliability rows recorded by the tests here')


# Temporary folders of the test run: only the file name is meaningful (and the table then is reproducible).
_TMP_PATH = re.compile(r'\S*/pytest-of-[^/\s]+/pytest-\d+/(?:[^/\s]+/)*')


def _short(text: str) -> str:
    text = _TMP_PATH.sub('', ' '.join(str(text).split()))
    return text if len(text) <= _MAX_OBSERVED else text[: _MAX_OBSERVED - 3] + '...'


class Recorder:
    def __init__(self, nodeid: str):
        self.nodeid = nodeid
        self.rows: list[dict] = []

    def record(self, entry_point: str, malformed_input: str, observed: str) -> None:
        self.rows.append(
            {'entry_point': entry_point, 'input': malformed_input, 'observed': _short(observed), 'test': self.nodeid}
        )

    def raises(self, entry_point: str, malformed_input: str, expected, function, *args, **kwargs) -> BaseException:
        """Call ``function``; assert it raises ``expected``; record the exception type and message; return it."""
        with pytest.raises(expected) as info:
            function(*args, **kwargs)
        self.record(entry_point, malformed_input, f'{type(info.value).__name__}: {info.value}')
        return info.value


@pytest.fixture
def reliability(request):
    recorder = Recorder(request.node.nodeid)
    yield recorder
    report = getattr(request.node, '_reliability_call_report', None)
    if report is not None and report.passed:
        _ROWS.extend(recorder.rows)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == 'call':
        item._reliability_call_report = report


def pytest_sessionfinish(session):
    path = session.config.getoption('--reliability-json')
    if path:
        with open(path, 'w') as handle:
            json.dump(sorted(_ROWS, key=lambda r: (r['entry_point'], r['test'], r['input'])), handle, indent=1)
