"""A structure that used to kill the daemon worker (SIGFPE in vesin), submitted to a real daemon.

Imported by ``test_reliability_daemon.py`` in a fresh interpreter with its own AiiDA profile (as
``conftest_train.daemon_scenario``): the pytest session profile has no broker.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest_train import _stop_daemon, _wait, ensure_entry_points, random_model_file


def _worker_pids(client) -> list[int]:
    info = client.get_worker_info().get('info') or {}
    return sorted(int(pid) for pid in info)


def predict_scenario(root: str) -> dict:
    from aiida import orm
    from aiida.engine import submit
    from aiida.engine.daemon.client import get_daemon_client
    from aiida.manage import get_manager
    from aiida.manage.configuration import create_profile, get_config, load_profile

    config = get_config(create=True)
    profile = create_profile(
        config, storage_backend='core.sqlite_dos', storage_config={'filepath': os.path.join(root, 'storage')},
        broker_backend='core.zeromq', broker_config={}, name='eqml-reliability', email='test@localhost', is_test_profile=True,
    )
    config.set_default_profile(profile.name, overwrite=True)
    config.store()
    load_profile(profile.name, allow_switch=True)
    ensure_entry_points()

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

    broker = get_manager().get_broker()
    broker._service_dir.mkdir(parents=True, exist_ok=True)
    broker_process = subprocess.Popen(
        [sys.executable, '-m', 'aiida.brokers.zeromq.service', '--service-dir', str(broker._service_dir)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait(broker.check_service_reachable, 180, 'the ZeroMQ broker service')
    client = get_daemon_client(profile.name)
    client.start_daemon(number_workers=1)
    result = {}
    try:
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
    finally:
        try:
            _stop_daemon(client)
        except Exception:  # noqa: BLE001 - reported through the result
            pass
        broker_process.send_signal(signal.SIGINT)
        try:
            broker_process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            broker_process.kill()
