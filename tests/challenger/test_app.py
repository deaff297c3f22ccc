"""The watchtower's Celery app is configured by a function, not by its import: importing it
reads no settings; Celery's first read of its configuration loads them (what `celery -A
optinfer.challenger.app worker|beat` relies on), and `configure` given other settings first
wins."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

PROBE = """
import optinfer.challenger.app as module
print("imported")
print(module.app.conf.broker_url, module.is_eager(), module.app.conf.task_default_queue)
"""


def _probe(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTINFER_")}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120, env={**clean, **env})


def test_importing_the_app_reads_no_settings_and_its_first_use_does():
    broken = _probe(OPTINFER_CONFIG="/nonexistent/optinfer.toml")
    assert broken.stdout.splitlines() == ["imported"]  # the import itself succeeded
    assert "config file /nonexistent/optinfer.toml" in broken.stderr
    queued = _probe(OPTINFER_BROKER_URL="redis://127.0.0.1:6379/3",
                    OPTINFER_CELERY_QUEUE="from-env")
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.splitlines()[1] == "redis://127.0.0.1:6379/3 False from-env"
    eager = _probe()
    assert eager.stdout.splitlines()[1].startswith("memory:// True")


def test_configure_before_the_first_read_wins():
    script = """
from optinfer.challenger import app as module
from optinfer.services.settings import load_settings
module.configure(load_settings(celery_queue="mine", broker_url="redis://127.0.0.1:6379/4"))
conf = module.app.conf
print(conf.task_default_queue, conf.broker_url, module.settings().celery_queue)
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTINFER_")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**clean, "OPTINFER_CELERY_QUEUE": "from-env"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["mine", "redis://127.0.0.1:6379/4", "mine"]


def test_every_task_has_a_soft_and_a_hard_time_limit():
    """A prefork worker ends a task that hangs (a node that never answers, say): every task
    of the app declares both limits, the hard one after the soft one, which leaves the task
    time to release what it holds."""
    from optinfer.challenger import tasks
    from optinfer.challenger.app import app
    from optinfer.challenger.watchtower import MOVES_PER_TURN
    from optinfer.contracts.sender import TxSender

    ours = {name: task for name, task in app.tasks.items() if name.startswith("optinfer.")}
    assert set(ours) == {tasks.SCAN, tasks.VERIFY, tasks.VERIFY_MANY, tasks.PLAY}
    for name, task in ours.items():
        assert 0 < task.soft_time_limit < task.time_limit, name
    # A play task's moves alone may take MOVES_PER_TURN receipt waits: the limit leaves them.
    receipt_wait = inspect.signature(TxSender).parameters["receipt_timeout"].default
    assert tasks.PLAY_LIMITS[0] > MOVES_PER_TURN * receipt_wait


def test_issue20_point8_an_unreachable_broker_is_one_line_after_bounded_logged_retries(
        tmp_path):
    """Celery retried a missing broker forever at start-up, without a word; `challenger run`
    now tries a few times, logging each, and stops with one line naming the broker."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the probe is: nobody listens there
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTINFER_")}
    started = time.monotonic()
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "optinfer"), "challenger", "run"],
        capture_output=True, text=True, timeout=120,
        env={**clean, "OPTINFER_BROKER_URL": f"redis://127.0.0.1:{port}/0",
             "OPTINFER_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 60
    retries = [line for line in proc.stderr.splitlines() if "trying again in" in line]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(retries) == 4 and len(errors) == 1, proc.stderr
    assert f"the broker redis://127.0.0.1:{port}/0 is unreachable after 5 attempts" in errors[0]
    assert "Traceback" not in proc.stderr
