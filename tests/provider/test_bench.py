"""`optinfer bench provider --json`: the honest path's overhead, as a user runs it."""

from __future__ import annotations

import json

from .conftest import optinfer


def test_bench_provider_reports_the_overhead_and_each_request():
    result = optinfer("bench", "provider", "--requests", "3", "--max-tokens", "8", "--json",
                      timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 3 and len(report["per_request"]) == 3
    serve, generation = report["serve_with_commit_s"], report["generation_s"]
    half = 5e-5  # both times are rounded to 0.1 ms, the ratio to 4 decimals
    assert (serve - half) / (generation + half) - 1e-4 <= report["overhead"] \
        <= (serve + half) / (generation - half) + 1e-4
    assert report["tokens"] == sum(r["tokens"] for r in report["per_request"])
    for request in report["per_request"]:
        assert 1 <= request["tokens"] <= 8
        assert request["latency_s"] >= request["commit_s"] > 0
    assert set(report["latency_s"]) == {"p50", "max"}
