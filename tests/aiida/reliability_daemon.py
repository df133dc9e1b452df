"""A structure that used to kill the daemon worker (SIGFPE in vesin), submitted to a real daemon.

Imported by ``test_reliability_daemon.py`` in a fresh interpreter with its own AiiDA profile (as
``conftest_train.daemon_scenario``): the pytest session profile has no broker.
"""
from __future__ import annotations

import os

from conftest_train import _wait, daemon_profile, random_model_file


def _worker_pids(client) -> list[int]:
    info = client.get_worker_info().get('info') or {}
    return sorted(int(pid) for pid in info)


def predict_scenario(root: str) -> dict:
    from aiida import orm
    from aiida.engine import submit

    result = {}
    with daemon_profile(root, 'eqml-reliability') as (_, client, _broker):
        from aiida_eqml.calculations.functions.predict import predict_tensors
        from aiida_eqml.data.model import EqmlModelData

        path, _ = random_model_file(os.path.join(root, 'model.eqml'))
        model = EqmlModelData(filepath=path).store()
        bad = orm.StructureData(cell=[[10, 0, 0], [0, 10, 0], [0, 0, 10]], pbc=(False, False, False))
        bad.append_atom(position=(0, 0, 0), symbols='O')
        bad.append_atom(position=(4e5, 0, 0), symbols='Ti')
        good = orm.StructureData(cell=[[3.2, 0, 0], [0, 3.2, 0], [0, 0, 3.2]])
        good.append_atom(position=(0, 0, 0), symbols='Ti')
        good.append_atom(position=(1.6, 1.6, 0), symbols='O')

        _wait(lambda: bool(_worker_pids(client)), 120, 'a daemon worker')
        result['workers_before'] = _worker_pids(client)
        first = submit(predict_tensors, structure=bad, model=model)
        _wait(lambda: first.is_terminated, 300, 'the prediction on the bad structure to end')
        second = submit(predict_tensors, structure=good, model=model)
        _wait(lambda: second.is_terminated, 300, 'the next prediction to end')
        result.update(
            first_state=first.process_state.value, first_exit_status=first.exit_status,
            first_exit_message=first.exit_message, first_exception=(first.exception or '')[-600:],
            second_ok=second.is_finished_ok, second_exit_status=second.exit_status,
            second_outputs=sorted(second.outputs), workers_after=_worker_pids(client),
        )
    return result
