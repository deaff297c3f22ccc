"""The watchtower's Prometheus metrics (one set per process; `serve` exposes them over HTTP).

Counters and the latency histogram count what this process did; the dispute gauges are read
back from the database at every scan, so any process of a deployment reports the same totals.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from optinfer.services.statuses import GameStatus

CLAIMS_SEEN = Counter("optinfer_watchtower_claims_seen",
                      "Claims (OutputCommitted events) this process recorded first.")
CLAIMS_VERIFIED = Counter("optinfer_watchtower_claims_verified",
                          "Claims this process judged, by verdict.", ["verdict"])
VERIFICATION_SECONDS = Histogram(
    "optinfer_watchtower_verification_seconds",
    "Time of one teacher-forced verification of a claim.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHALLENGES_SENT = Counter("optinfer_watchtower_challenges_sent",
                          "Challenge transactions this process sent.")
MOVES_SENT = Counter("optinfer_watchtower_moves_sent",
                     "Dispute-game moves this process sent, by kind.", ["kind"])
DISPUTES = Gauge("optinfer_watchtower_disputes",
                 "The watchtower's games by status (open, won, lost).", ["status"])
BOND_AT_RISK = Gauge("optinfer_watchtower_bond_at_risk_wei",
                     "Wei of challenger bonds in games still open.")
CLOCK_SECONDS = Gauge("optinfer_watchtower_clock_seconds",
                      "Seconds left on each party's clock of an open game, at its last read.",
                      ["game", "party"])

_served: set[int] = set()


def serve(port: int) -> None:
    """Expose the metrics on ``0.0.0.0:port`` (once per process and port)."""
    if port not in _served:
        start_http_server(port)
        _served.add(port)


def set_disputes(counts: dict[GameStatus, int], bond: int) -> None:
    """The dispute gauges from the database's game counts and the bond per game."""
    for status in GameStatus:
        DISPUTES.labels(status=status.value).set(counts.get(status, 0))
    BOND_AT_RISK.set(counts.get(GameStatus.OPEN, 0) * bond)


def set_clocks(game_id: int, seconds: dict[str, float] | None) -> None:
    """Each party's time left in game `game_id`; None drops the game (it is resolved)."""
    for party in ("provider", "challenger"):
        if seconds is None:
            with contextlib.suppress(KeyError):  # never set in this process
                CLOCK_SECONDS.remove(str(game_id), party)
        else:
            CLOCK_SECONDS.labels(game=str(game_id), party=party).set(seconds[party])
