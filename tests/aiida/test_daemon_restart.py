"""The daemon is stopped while a training job runs and started again: the job is picked up and finishes.

Runs in its own interpreter and AiiDA profile (ZeroMQ broker beside the daemon, restarted with it, see
``conftest_train.daemon_scenario``): the pytest session profile has no broker, and switching profiles inside the
session would invalidate the nodes held by its session fixtures.
"""
from __future__ import annotations

from conftest_train import run_daemon_scenario


def test_daemon_stopped_during_training_job_and_restarted(tmp_path):
    result = run_daemon_scenario(tmp_path, interrupt=True, epochs=20)
    assert result['job_running_when_daemon_stopped'], result['events']
    # While the daemon was down nothing advanced the process: still waiting on its job.
    assert result['state_while_daemon_down'] == 'waiting'
    assert result['finished_ok'], result
    # The restarted daemon picked up the same job (no resubmission), retrieved and parsed it.
    assert result['n_calcs'] == 1
    assert result['job_id_after'] == result['job_id_before']
    assert result['calc_exit_status'] == 0
    assert {'model', 'metrics', 'learning_curve', 'checkpoint'} <= set(result['outputs'])
    assert result['model']['species'] == ['O', 'Ti'] and result['epochs_run'] == 20
