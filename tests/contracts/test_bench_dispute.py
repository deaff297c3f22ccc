"""`optinfer bench dispute` end to end on tiny-r1 (the R1-shape run is the same code on a
bigger model; its numbers live in docs/performance.md). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from optinfer.models.tiny_r1 import INTEGER_DIR, SAMPLING_DIR

OPTINFER = str(Path(sys.executable).parent / "optinfer")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPTINFER, *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def bisection_rounds(node_count: int, first_wrong: int) -> int:
    """Midpoints the provider posts before [lo, hi] closes on the first wrong node."""
    lo, hi, rounds = 0, node_count, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mid < first_wrong else (lo, mid)
        rounds += 1
    return rounds


def test_bench_dispute_plays_a_whole_game_and_reports_the_issue_keys():
    result = cli("bench", "dispute", "--model", INTEGER_DIR, "--prompt", "5", "--tokens", "4",
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["winner"] == "challenger"
    assert report["lie"]["op"] == "MatMulInteger"
    rounds = report["rounds"]
    assert rounds["await_root"] == 1 and rounds["leaf_reveal"] == 1
    assert rounds["bisection"] == bisection_rounds(report["nodes"], report["lie"]["node"])
    assert rounds["total"] == sum(v for k, v in rounds.items() if k != "total")
    assert {"MatMulInteger", "ReduceSum", "ArgMax", "Gather", "Div"} <= set(
        report["one_step_gas"])
    assert report["max_one_step_gas"] == max(report["one_step_gas"].values())
    moves = report["moves"]
    assert moves[-1]["move"] == "OneStep"
    assert report["max_move_gas"] == max(m["gas"] for m in moves if m["move"] != "OneStep")
    sides = report["total_gas"]
    assert sides["provider"] == sum(m["gas"] for m in moves if m["role"] == "provider")
    assert sides["challenger"] == report["challenge_gas"] + sum(
        m["gas"] for m in moves if m["role"] == "challenger")
    assert report["commit_gas"] > 21_000 and report["peak_rss_bytes"] > 0
    assert report["full_model"]["layers"] == 28
    # Issue 17, point 3: the largest request is committed and challenged on a chain that
    # enforces the 2**24 cap, and no transaction of the whole game comes near it.
    assert report["tx_gas_cap"] == 2**24
    at_max = report["max_request"]
    assert at_max["context_tokens"] == 8192
    assert report["challenge_gas_at_max_request"] == max(
        shape["challenge"] for key, shape in at_max.items() if key.startswith("output_"))
    assert report["max_tx_gas"] >= max(report["challenge_gas_at_max_request"],
                                       report["commit_gas_at_max_request"],
                                       report["max_one_step_gas"], report["max_move_gas"])
    assert report["max_tx_gas"] < 2**24 * 3 // 4


def test_bench_dispute_on_a_sampled_request_reports_the_sampler_s_one_steps():
    """Issue 22: `--sampling` asks for a drawn answer (the seed the chain's), plays the game
    over it to the one-step, and reports the costliest one-step of each sampler op type;
    every one is far under the 1.5M bound at tiny-r1's vocabulary (R1's figures:
    docs/performance.md)."""
    result = cli("bench", "dispute", "--model", SAMPLING_DIR, "--prompt", "5", "--tokens", "4",
                 "--sampling", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["winner"] == "challenger"
    assert report["draw"]["temperature"] == 600 and report["draw"]["top_p"] == 950
    assert report["draw"]["seed"] != 7  # derived by the coordinator from the consumer's
    sampler = report["sampler_one_step_gas"]
    assert {"ReduceSum", "GatherElements", "Mul", "Add", "Clip"} <= set(sampler)
    assert all(name.startswith("sample") for name in report["sampler_one_step_nodes"].values())
    assert report["max_sampler_one_step_gas"] == max(sampler.values()) < 1_500_000
    greedy_only = cli("bench", "dispute", "--model", INTEGER_DIR, "--sampling")
    assert greedy_only.returncode == 2 and "decodes greedily only" in greedy_only.stderr


def test_bench_dispute_refuses_a_directory_that_is_not_a_model(tmp_path):
    result = cli("bench", "dispute", "--model", tmp_path)
    assert result.returncode == 2
    assert "not a converted model" in result.stderr and "Traceback" not in result.stderr
