"""`optinfer bench provider --json`: the honest path's overhead, as a user runs it."""

from __future__ import annotations

import json
import os

import pytest

from optinfer.services.provider_bench import overhead_interval

from .conftest import optinfer


def test_bench_provider_reports_the_overhead_and_each_request():
    result = optinfer("bench", "provider", "--requests", "4", "--rounds", "2", "--max-tokens",
                      "8", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 4 and len(report["per_request"]) == 4
    serve, generation = report["serve_with_commit_s"], report["generation_s"]
    half = 5e-5  # both times are rounded to 0.1 ms, the ratio to 4 decimals
    assert (serve - half) / (generation + half) - 1e-4 <= report["overhead"] \
        <= (serve + half) / (generation - half) + 1e-4
    # The totals are the rounds' sums; two rounds are too few for an interval.
    assert report["rounds"] == len(report["per_round"]) == 2
    assert sum(r["generation_s"] for r in report["per_round"]) == pytest.approx(generation,
                                                                                abs=2e-4)
    assert sum(r["serve_with_commit_s"] for r in report["per_round"]) == pytest.approx(
        serve, abs=2e-4)
    assert report["overhead_interval_95"] is None
    assert "round 2/2: 2 requests" in result.stderr
    assert report["tokens"] == sum(r["tokens"] for r in report["per_request"])
    for request in report["per_request"]:
        assert 1 <= request["tokens"] <= 8
        assert request["latency_s"] >= request["commit_s"] > 0
    assert set(report["latency_s"]) == {"p50", "max"}
    # The generation process's own times, side by side: on a CPU, and waiting for one.
    process = report["generation_process"]
    assert process["alone"]["wall_s"] == pytest.approx(generation, abs=2e-4)
    assert process["serving"]["wall_s"] == pytest.approx(serve, abs=2e-4)
    for side in ("alone", "serving"):
        assert 0 < process[side]["on_cpu_s"] <= process[side]["wall_s"] + 0.01
        assert 0 <= process[side]["waiting_for_cpu_s"] < process[side]["wall_s"]
        assert sum(r["on_cpu_s"][side] for r in report["per_round"]) == pytest.approx(
            process[side]["on_cpu_s"], abs=2e-4)
    # Wall time per CPU second, serving over alone, from the four rounded times.
    (wall_s, cpu_s), (wall_a, cpu_a) = ((process[side]["wall_s"], process[side]["on_cpu_s"])
                                        for side in ("serving", "alone"))
    lowest = (wall_s - half) / (cpu_s + half) / ((wall_a + half) / (cpu_a - half))
    highest = (wall_s + half) / (cpu_s - half) / ((wall_a - half) / (cpu_a + half))
    assert lowest - 1e-4 <= report["overhead_off_cpu"] <= highest + 1e-4
    # Pinned as `provider run` pins by default: the generation on the last CPU.
    everything = sorted(os.sched_getaffinity(0))
    if len(everything) > 1:
        assert report["generation_cpus"] == everything[-1:]
        assert report["serving_cpus"] == everything[:-1]


def test_bench_provider_on_a_chain_that_mines_every_second():
    result = optinfer("bench", "provider", "--requests", "3", "--rounds", "1", "--max-tokens",
                      "8", "--block-time", "1", "--generation-cpus", "none", "--json",
                      timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["block_time_s"] == 1 and len(report["per_request"]) == 3
    assert report["generation_cpus"] is None and report["serving_cpus"] is None  # none asked
    assert all(request["commit_s"] > 0 for request in report["per_request"])


def test_more_rounds_than_requests_is_refused_before_anything_starts():
    result = optinfer("bench", "provider", "--requests", "3", "--rounds", "4", "--json")
    assert result.returncode == 2
    assert "--rounds 4 is more than --requests 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_generation_cpus_the_machine_lacks_are_refused_in_one_line():
    result = optinfer("bench", "provider", "--requests", "3", "--generation-cpus", "4096")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "generation_cpus '4096': CPU 4096 is not available" in result.stderr


def test_the_interval_of_rounds_with_one_ratio_is_that_ratio():
    rounds = [(1.0, 1.03), (2.0, 2.06), (0.5, 0.515), (1.5, 1.545)]
    assert overhead_interval(rounds) == [1.03, 1.03]


def test_the_interval_holds_the_overall_ratio_and_stays_within_the_rounds():
    rounds = [(1.0, 0.95), (1.2, 1.38), (0.9, 0.99), (1.1, 1.1), (1.0, 1.2), (1.3, 1.30)]
    low, high = overhead_interval(rounds)
    overall = sum(s for _, s in rounds) / sum(g for g, _ in rounds)
    ratios = [s / g for g, s in rounds]
    assert min(ratios) <= low < overall < high <= max(ratios)
    assert overhead_interval(rounds) == [low, high]  # seeded: the same report twice
    assert overhead_interval(rounds[:3]) is None
