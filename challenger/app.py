"""The watchtower's Celery app: ``celery -A optinfer.challenger.app worker`` runs it.

Configured by :func:`configure` with a command's or test's own settings, or else from
``load_settings()`` (OPTINFER_* and the config file) when Celery first reads its
configuration, as ``celery -A optinfer.challenger.app worker|beat`` does: importing this module
reads no settings. With a broker (``broker_url``, Redis in production) tasks go through the queue
``celery_queue`` and beat sends ``scan`` every ``poll_interval`` seconds; without one, Celery
runs in eager mode (``task_always_eager``): each task runs inline where it is sent, which is
how the embedded demo runs everything in one process (see ``tasks.run_eager``).

Tasks keep no results (state lives in the database), are acknowledged on receipt (a task lost
with a killed worker is found again by the next scan: claims without a verdict, challenges
left `sending`, games whose play stopped) and a worker takes one message at a time, so a slow
verification never holds others hostage.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from celery.beat import PersistentScheduler

from optinfer.services.settings import Settings, load_settings


class _App(Celery):
    def on_configure(self) -> None:
        """Celery calls this when it first reads its configuration: the settings of the
        environment, unless `configure` was given others before."""
        if _settings is None:
            configure(load_settings())


app = _App("optinfer.challenger", include=["optinfer.challenger.tasks"])

_settings: Settings | None = None


def configure(settings: Settings) -> Celery:
    """Point the app at `settings` (broker, queue, beat interval) and return it."""
    global _settings
    _settings = settings
    eager = settings.broker_url is None
    app.conf.update(
        broker_url=settings.broker_url or "memory://",
        task_always_eager=eager,
        task_eager_propagates=True,
        task_default_queue=settings.celery_queue,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        beat_schedule={
            "scan": {"task": "optinfer.challenger.scan", "schedule": settings.poll_interval,
                     # A scan not started by the next one is pointless: drop it.
                     "options": {"expires": max(settings.poll_interval * 5, 5.0)}},
        },
        beat_schedule_filename=str(settings.state_dir / "celerybeat-schedule"),
        beat_scheduler="optinfer.challenger.app:Schedule",
    )
    return app


class Schedule(PersistentScheduler):
    """Celery's file-backed beat schedule, in a directory created when beat starts (it lives
    under state_dir, which a fresh container does not have yet)."""

    def setup_schedule(self) -> None:
        Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()


def settings() -> Settings:
    """The settings the app was configured with."""
    if _settings is None:
        configure(load_settings())
    assert _settings is not None
    return _settings


def is_eager() -> bool:
    return bool(app.conf.task_always_eager)
