"""Prometheus metrics of a node, read from its database and the chain when scraped.

Nothing is exported by the provider node itself: the store already holds what it did, and
reading it at scrape time means the API reports the same numbers whichever process served,
and after any restart. The metrics (``optinfer_`` prefix):

========================================  ========  ==========================================
name                                      type      meaning
========================================  ========  ==========================================
``requests{status}``                      gauge     requests in the database by the node's
                                                    status (open, committed, skipped, ...)
``requests_served_total``                 counter   claims committed by this node's provider
                                                    account
``commit_latency_seconds``                histogram block time from a request to this node's
                                                    claim on it
``games{role,status}``                    gauge     dispute games by the role this node plays
                                                    and their status (open, won, lost)
``provider_stake_wei{kind}``              gauge     the provider account's stake on chain,
                                                    ``total`` and ``locked`` in claims
``chain_up``                              gauge     1 when the chain answered this scrape
========================================  ========  ==========================================

The latency histogram counts each claim once, in block order, as the scrapes find them (at
most :data:`LATENCY_BATCH` new claims a scrape, so a node with a long history catches up over
a few scrapes instead of stalling one); it restarts from the first claim when the API restarts,
which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from web3 import Web3

from optinfer.contracts.coordinator import InferenceCoordinator
from optinfer.services.store import Store, claims, games, requests

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_BATCH = 500
BLOCK_TIME_CACHE = 100_000


@dataclass(frozen=True)
class ChainView:
    """What the metrics read from the chain: the coordinator and this node's provider account
    (None without a provider key: the provider's metrics are left out)."""

    w3: Web3
    coordinator: InferenceCoordinator
    provider: str | None


class NodeMetrics(Collector):
    """The node's metrics in a registry of their own (one per app: tests build many).

    `chain()` gives the chain view, or raises (no deployment, node down) -- then the chain's
    metrics are left out and ``chain_up`` is 0.
    """

    def __init__(self, store: Store, chain: Callable[[], ChainView]):
        self.store = store
        self.chain = chain
        self.registry = CollectorRegistry(auto_describe=False)
        self.commit_latency = Histogram(
            "optinfer_commit_latency_seconds",
            "Block time from a request to this node's claim on it.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._latency_after: tuple[int, int] = (-1, -1)  # (block, request id) last observed
        self._block_times: dict[int, int] = {}

    def collect(self) -> Iterator[Metric]:
        with self.store.transaction() as conn:
            by_status = conn.execute(
                sa.select(requests.c.status, sa.func.count()).group_by(requests.c.status)
            ).all()
            by_game = conn.execute(
                sa.select(games.c.player, games.c.status, sa.func.count())
                .group_by(games.c.player, games.c.status)
            ).all()
        family = GaugeMetricFamily("optinfer_requests", "Requests in the node's database by "
                                   "status.", labels=["status"])
        for status, count in sorted(by_status):
            family.add_metric([status], count)
        yield family
        family = GaugeMetricFamily("optinfer_games", "Dispute games by the role this node "
                                   "plays and their status.", labels=["role", "status"])
        for role, status, count in sorted(by_game):
            family.add_metric([role, status], count)
        yield family

        up = GaugeMetricFamily("optinfer_chain_up", "1 when the chain answered this scrape.")
        try:
            view = self.chain()
            stake = view.coordinator.provider_stake(view.provider) if view.provider else None
        except Exception as err:  # noqa: BLE001 -- a scrape reports the chain down, never fails
            log.warning("metrics: chain unavailable: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        if view.provider is None:
            return
        family = GaugeMetricFamily("optinfer_provider_stake_wei", "The provider account's "
                                   "stake on chain.", labels=["kind"])
        family.add_metric(["total"], stake[0])
        family.add_metric(["locked"], stake[1])
        yield family
        with self.store.transaction() as conn:
            served = conn.execute(
                sa.select(sa.func.count()).select_from(claims).where(_by(view.provider))
            ).scalar_one()
        yield CounterMetricFamily("optinfer_requests_served", "Claims committed by this "
                                  "node's provider account.", value=served)

    def refresh(self) -> None:
        """Observe the commit latency of claims found since the last scrape (see the module
        docstring); the chain's block times are read once each."""
        with self._lock:
            try:
                view = self.chain()
            except Exception:  # noqa: BLE001 -- collect() reports the chain down
                return
            if view.provider is None:
                return
            block, request_id = self._latency_after
            with self.store.transaction() as conn:
                rows = conn.execute(
                    sa.select(claims.c.block_number, claims.c.request_id,
                              requests.c.block_number)
                    .join(requests, requests.c.request_id == claims.c.request_id)
                    .where(_by(view.provider),
                           sa.tuple_(claims.c.block_number, claims.c.request_id)
                           > sa.tuple_(block, request_id))
                    .order_by(claims.c.block_number, claims.c.request_id)
                    .limit(LATENCY_BATCH)
                ).all()
            for claim_block, claim_request, request_block in rows:
                try:
                    latency = self._time(view, claim_block) - self._time(view, request_block)
                except Exception:  # noqa: BLE001 -- the rest next scrape
                    return
                self.commit_latency.observe(max(latency, 0))
                self._latency_after = (claim_block, claim_request)

    def _time(self, view: ChainView, block: int) -> int:
        if block not in self._block_times:
            if len(self._block_times) >= BLOCK_TIME_CACHE:
                self._block_times.clear()
            self._block_times[block] = view.w3.eth.get_block(block)["timestamp"]
        return self._block_times[block]


def _by(provider: str):
    # Addresses are stored as the events give them (checksummed); compare without case.
    return sa.func.lower(claims.c.provider) == provider.lower()
