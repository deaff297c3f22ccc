"""`optinfer bench throughput`: continuous batching's aggregate decode throughput.

Every request of a level arrives at once; at concurrency c at most c of them decode together
(``batching.DecodeBatch``), the next joining as soon as one leaves. Each level runs
max(2c, 8) requests with prompts of mixed lengths and a fixed number of output tokens (no EOS
stop, so every level does the same work per request). The single-request path
(``IntegerModel.generate`` on the converter's decode graph) answers every prompt first: its
tokens are the reference every batched answer must equal (``batch_invariance_mismatches``),
and its rate the single-stream baseline the batch engine at concurrency 1 is compared with.
"""

from __future__ import annotations

import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np

from optinfer.errors import UserError

DEFAULT_CONCURRENCY = (1, 4, 8, 16)
PROMPT_LENGTHS = (8, 24, 48, 96)  # cycled: a level's requests mix short and long prompts


def parse_concurrency(text: str) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8); UserError for anything else."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise UserError(f"--concurrency must list levels of at least 1, got {text!r}")
    return tuple(sorted(set(levels)))


def prompts(count: int, vocab_size: int, max_len: int) -> list[list[int]]:
    """`count` seeded random prompts, lengths cycling through PROMPT_LENGTHS (capped)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, min(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)], max_len)
                         ).tolist() for i in range(count)]


def requests_at(level: int) -> int:
    """Requests a level runs: two waves of `level`, and at least 8 (a steadier figure)."""
    return max(2 * level, 8)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run_level(model, jobs: list[list[int]], tokens: int, concurrency: int) -> dict:
    """Decode `jobs` (prompts) `concurrency` at a time; outputs, wall time and each job's
    first-token and last-token times from the start (the arrival of every job)."""
    from optinfer.models.batching import DecodeBatch

    batch = DecodeBatch(model)
    waiting = list(range(len(jobs)))
    first, last, outputs = {}, {}, {}
    start = time.perf_counter()
    while waiting or len(batch):
        while waiting and len(batch) < concurrency:
            index = waiting.pop(0)
            batch.add(index, jobs[index], tokens, stop_at_eos=False)
        steps = batch.step()
        now = time.perf_counter() - start
        for step in steps:
            first.setdefault(step.sequence, now)
            if step.done:
                last[step.sequence] = now
                outputs[step.sequence] = batch.take(step.sequence)
    wall = time.perf_counter() - start
    order = range(len(jobs))
    return {"outputs": [outputs[i] for i in order], "wall_s": wall,
            "ttft_s": [first[i] for i in order], "latency_s": [last[i] for i in order]}


def bench_throughput(model_dir: Path, concurrency: tuple[int, ...], tokens: int, threads: int,
                     log=print) -> dict:
    """The benchmark's JSON document for the converted model in `model_dir`."""
    from optinfer.models.bench import cpu_name, peak_rss_bytes_of_process
    from optinfer.models.runtime import IntegerModel

    if tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {tokens}")
    model = IntegerModel(model_dir, threads=threads)
    max_prompt = model.max_context - tokens + 1
    if max_prompt < 1:
        raise UserError(f"--tokens {tokens} leaves no room for a prompt in the model's "
                        f"context of {model.max_context}")
    jobs = prompts(max(requests_at(level) for level in concurrency), model.vocab_size,
                   max_prompt)
    log(f"single-request path: {len(jobs)} requests of {tokens} tokens, one at a time")
    model.generate(jobs[0][:4], 2, stop_at_eos=False)  # load and warm the decode session
    reference, started = [], time.perf_counter()
    for prompt in jobs:
        reference.append(model.generate(prompt, tokens, stop_at_eos=False))
    single_s = time.perf_counter() - started
    run_level(model, jobs[:1], 2, 1)  # load and warm the batch session
    levels, mismatches = {}, 0
    for level in concurrency:
        count = requests_at(level)
        log(f"concurrency {level}: {count} requests of {tokens} tokens")
        result = run_level(model, jobs[:count], tokens, level)
        mismatches += sum(out != ref for out, ref in
                          zip(result["outputs"], reference[:count], strict=True))
        levels[level] = result
    throughput = {str(level): round(len(r["outputs"]) * tokens / r["wall_s"], 2)
                  for level, r in levels.items()}
    single_stream = len(jobs) * tokens / single_s
    document = {
        "benchmark": "throughput",
        "model": str(model_dir),
        "config": {key: model.manifest["config"][key] for key in
                   ("num_layers", "hidden_size", "intermediate_size", "vocab_size")},
        "cpu": cpu_name(),
        "threads": threads,
        "date": date.today().isoformat(),
        "tokens_per_request": tokens,
        "prompt_lengths": sorted({len(p) for p in jobs}),
        "concurrency": list(concurrency),
        "throughput": throughput,
        "single_request_path_tokens_per_s": round(single_stream, 2),
        "ttft_p50_s": {str(k): round(_percentile(r["ttft_s"], 50), 3) for k, r in levels.items()},
        "ttft_p95_s": {str(k): round(_percentile(r["ttft_s"], 95), 3) for k, r in levels.items()},
        "latency_p50_s": {str(k): round(_percentile(r["latency_s"], 50), 3)
                          for k, r in levels.items()},
        "latency_p95_s": {str(k): round(_percentile(r["latency_s"], 95), 3)
                          for k, r in levels.items()},
        "peak_rss_bytes": peak_rss_bytes_of_process(),
        "batch_invariance_mismatches": mismatches,
    }
    if 1 in levels:
        document["batched_at_1_over_single_path"] = round(
            float(throughput["1"]) / single_stream, 3)
        if 8 in levels:
            document["speedup_at_8"] = round(float(throughput["8"]) / float(throughput["1"]), 2)
    document["median_request_tokens_per_s"] = {
        str(k): round(statistics.median(tokens / t for t in r["latency_s"]), 2)
        for k, r in levels.items()}
    return document
