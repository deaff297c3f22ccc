"""The watchtower's Celery tasks. Each takes ids, re-reads what it needs and is safe to run
twice (see ``watchtower.py``); their names are stable (a test pins them), since queued
messages name them.

* ``scan`` (beat, every poll interval): new claims -> ``verify_many`` for each chunk of up to
  ``VERIFY_CHUNK``; half-done work found again (claims without a verdict, challenges left
  `sending`, stopped games) is sent again.
* ``verify_many(request_ids)``: judge the claims, those the model runs sharing its passes
  (``Watchtower.verify_many``); a false one is challenged and ``play`` starts.
  ``verify(request_id)`` is one claim's (messages queued before ``verify_many`` name it).
* ``play(game_id, token)``: one turn, then ``play`` again after the countdown, until the game
  is resolved. The token names the game's one live chain of play tasks.

In eager mode nothing is queued: ``run_eager`` calls ``scan`` every poll interval, which
verifies the new claims inline and plays one turn of every open game.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import OperationalError

from optinfer.challenger.app import app, is_eager, settings
from optinfer.challenger.watchtower import Watchtower
from optinfer.services.chain import RpcUnavailable
from optinfer.services.store import database_error

log = logging.getLogger("optinfer.watchtower")

SCAN = "optinfer.challenger.scan"
VERIFY = "optinfer.challenger.verify"
VERIFY_MANY = "optinfer.challenger.verify_many"
PLAY = "optinfer.challenger.play"

# Time limits, in seconds (soft, hard). Celery enforces them in a prefork worker: the soft
# limit raises SoftTimeLimitExceeded inside the task (a game's lease is released on the way
# out), the hard one ends the child. The task is lost either way and the next scan finds its
# work again (a claim without a verdict, a challenge left `sending`, a stopped game). The
# thread pool of `challenger run` cannot interrupt a thread: there each step bounds itself
# (a transaction is waited for `receipt_timeout` seconds at most, a play task makes at most
# MOVES_PER_TURN moves) and only the model's own work, a verification or a trace, runs on.
SCAN_LIMITS = (120, 180)  # chain reads and database writes only
VERIFY_LIMITS = (1800, 1860)  # a teacher-forced pass of the largest model, then a challenge
VERIFY_MANY_LIMITS = (3600, 3660)  # the passes of a chunk of claims, then their challenges

VERIFY_CHUNK = 16
"""Claims one ``verify_many`` task judges: on a wide model they share the model's passes
(``batching.predict_many``; docs/performance.md), and a chunk still spreads over a
deployment's workers."""
PLAY_LIMITS = (900, 960)  # a trace, then up to MOVES_PER_TURN moves of 120 s each at most

_watchtower: Watchtower | None = None
_lock = threading.Lock()


def watchtower() -> Watchtower:
    """This process's Watchtower, built on first use (after a prefork worker forked)."""
    global _watchtower
    with _lock:
        if _watchtower is None:
            _watchtower = Watchtower(settings())
        return _watchtower


def use_watchtower(instance: Watchtower | None) -> None:
    """Make the tasks of this process use `instance` (a command or test that built one)."""
    global _watchtower
    with _lock:
        _watchtower = instance


@app.task(name=SCAN, soft_time_limit=SCAN_LIMITS[0], time_limit=SCAN_LIMITS[1])
def scan() -> int:
    """Scan the chain and send the work due; the number of new claims."""
    result = watchtower().scan(every_open_game=is_eager())
    for first in range(0, len(result.verify), VERIFY_CHUNK):
        verify_many.delay(result.verify[first:first + VERIFY_CHUNK])
    for game_id, token in result.play:
        play.delay(game_id, token)
    return result.new_claims


@app.task(name=VERIFY, soft_time_limit=VERIFY_LIMITS[0],
          time_limit=VERIFY_LIMITS[1])
def verify(request_id: int) -> str | None:
    """Judge the claim on `request_id`; challenge it when false. Its verdict."""
    result = watchtower().verify(request_id)
    if result.game is not None and not is_eager():
        play.delay(*result.game)
    return result.verdict.value if result.verdict else None


@app.task(name=VERIFY_MANY, soft_time_limit=VERIFY_MANY_LIMITS[0],
          time_limit=VERIFY_MANY_LIMITS[1])
def verify_many(request_ids: list[int]) -> list[str | None]:
    """Judge the claims on `request_ids`, challenging the false ones. Their verdicts."""
    results = watchtower().verify_many(request_ids)
    for result in results:
        if result.game is not None and not is_eager():
            play.delay(*result.game)
    return [result.verdict.value if result.verdict else None for result in results]


@app.task(name=PLAY, soft_time_limit=PLAY_LIMITS[0], time_limit=PLAY_LIMITS[1])
def play(game_id: int, token: str | None = None) -> str | None:
    """One turn of game `game_id`; again after the countdown while the chain is the game's."""
    result = watchtower().play(game_id, token)
    if result.again and token is not None and not is_eager():
        play.apply_async((game_id, token), countdown=result.countdown)
    return result.outcome


def run_eager(stop: threading.Event) -> None:
    """The single-process watchtower (eager mode): scan every poll interval until `stop`.
    A failed scan (the node unreachable, say) is logged and tried again."""
    interval = settings().poll_interval
    while not stop.is_set():
        try:
            scan.delay()
        except RpcUnavailable as err:  # the chain node away: one line
            log.error("scan failed (%s); trying again in %.1fs", err, interval)
        except OperationalError as err:  # the database away (restarting, say): one line
            log.error("scan failed (the database: %s); trying again in %.1fs",
                      database_error(err), interval)
        except Exception:
            log.exception("scan failed; trying again in %.1fs", interval)
        stop.wait(interval)
