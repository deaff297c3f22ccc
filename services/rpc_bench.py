"""``optinfer bench rpc``: what one JSON-RPC call costs the node's client, optinfer's
:class:`~optinfer.services.chain.RetryingHTTPProvider` against web3's own ``HTTPProvider``
(its default configuration, which retries too), on a fresh local anvil.

Why it is measured: the services keep a provider of their own (one kept-alive http.client
connection a thread, TCP_NODELAY, retries under the settings' policy) where web3 7 ships one
that retries by itself. It stays only while it pays: a provider's commit makes three calls
and its CPU is taken beside generation. Each method is called ``calls``
times in ``rounds`` alternating rounds; the report gives the median wall and process CPU
milliseconds a call for each client, and the ratio.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from web3 import HTTPProvider, Web3

from optinfer.contracts.localchain import start_anvil
from optinfer.services.chain import connect

METHODS = (("eth_blockNumber", []),
           ("eth_getTransactionCount", ["0x" + "11" * 20, "pending"]),
           ("eth_getTransactionReceipt", ["0x" + "22" * 32]))
"""Calls a node makes every poll or commit, answered from anvil's memory."""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_call(w3: Web3, method: str, params: list, calls: int) -> tuple[float, float]:
    """(wall ms, CPU ms) of one call, over `calls` calls."""
    cpu, wall = _cpu_seconds(), time.perf_counter()
    for _ in range(calls):
        w3.provider.make_request(method, params)
    return (1000 * (time.perf_counter() - wall) / calls, 1000 * (_cpu_seconds() - cpu) / calls)


def bench_rpc(calls: int = 1000, rounds: int = 5,
              log: Callable[[str], Any] = lambda _: None) -> dict[str, Any]:
    """The report (see the module docstring)."""
    if calls < 1 or rounds < 1:
        raise ValueError("calls and rounds must be >= 1")
    with start_anvil() as chain:
        clients = {
            "optinfer": connect(chain.url),
            "web3": Web3(HTTPProvider(chain.url)),
        }
        for w3 in clients.values():  # connections open, caches warm
            _per_call(w3, "eth_blockNumber", [], 100)
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(rounds):
            log(f"round {round_ + 1} of {rounds}")
            for method, params in METHODS:
                for name, w3 in clients.items():
                    samples.setdefault((name, method), []).append(
                        _per_call(w3, method, params, calls))
    report: dict[str, Any] = {"machine": platform.machine(), "processor": _processor(),
                              "calls": calls, "rounds": rounds, "methods": {}}
    for method, _ in METHODS:
        row = {}
        for name in clients:
            runs = samples[(name, method)]
            row[f"{name}_wall_ms"] = statistics.median(wall for wall, _ in runs)
            row[f"{name}_cpu_ms"] = statistics.median(cpu for _, cpu in runs)
        row["web3_over_optinfer_cpu"] = row["web3_cpu_ms"] / row["optinfer_cpu_ms"]
        report["methods"][method] = row
    return report


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
