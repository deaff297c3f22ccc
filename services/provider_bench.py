"""``optinfer bench provider``: what committing costs the provider on the honest path.

On a fresh local anvil with the contracts deployed, N requests are posted; the node records
them, then serves them all (generation, the ``committing`` row, the commit transaction mined,
the claim recorded). ``overhead`` is that wall time divided by the wall time of generating the
same N answers alone, in rounds that alternate the two. As in ``optinfer provider run``, the
node generates in a process of its own and commits on a second thread while the next answer
is generated, so the target (<= 1.05) holds when a commit's work (the node's, the client's and
the chain's) fits beside a generation on the machine's cores.

With ``rounds`` of 4 or more the report adds ``overhead_interval_95``, a bootstrap interval
over the rounds: on a machine whose speed drifts (machine C's rounds of 50 answers, taken
back to back, differ by up to 1.7x), one run's ratio says little by itself. More rounds of
fewer requests each cost more than the serving does, though: every round ends on one commit
that nothing hides.

On anvil 1.7.1 (the project's local chain) a commit takes longer the more blocks the chain
holds, as anvil rebuilds its state trie for every block: 12 ms over the first 200 of 1,000
requests, 42 ms over the last 200 (docs/performance.md). Comparisons of the overhead keep
to one request count.

``block_time`` makes anvil mine every that many seconds instead of at each transaction, as a
real chain does: each serving round then ends on the block that takes its last commits.

``generation_cpus`` pins as ``optinfer provider run`` does (auto: on more CPUs than threads,
the generation process gets the last ones); the node's threads and the bench's anvil, which
stands in for a chain on other machines, get the rest.

``generation_process`` gives each side's time of the generation process on a CPU, and runnable
but waiting for one (from /proc/PID/schedstat). The host's speed scales a side's wall time and
its CPU time alike, so ``overhead_off_cpu``, the overhead in wall time per CPU second, does not
move with it as ``overhead`` does (on machine A, the same 25 answers took 0.7 to 1.9 times
the CPU time serving that they took alone, round by round). It counts what serving adds off
the CPU: waiting for a CPU, for the next job, and each round's last commit. What the serving's
work does to the generation's speed on its CPU (shared caches, memory) only ``overhead``
holds.

Generation alone runs in the same generation process, so that the two sides differ only by
the serving: two sessions of one model in two processes decode at speeds up to 5-10% apart,
depending on which loaded first (measured at R1-1.5B shape, docs/performance.md).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec
from optinfer.models.bench import cpu_name
from optinfer.models.generation import GenerationProcess, pin_this_thread, split_cpus
from optinfer.services.provider import ProviderNode

ROUNDS = 2


def bench_provider(requests: int = 200, max_tokens: int = 32, model_dir: Path | None = None,
                   threads: int = 1, seed: int = 0, rounds: int = ROUNDS,
                   block_time: int | None = None, generation_cpus: str = "auto",
                   log: Callable[[str], None] = lambda _: None) -> dict:
    from optinfer.contracts.localchain import start_anvil
    from optinfer.models.runtime import IntegerModel
    from optinfer.models.tiny_r1 import INTEGER_DIR
    from optinfer.services.chain import connect
    from optinfer.services.deployments import deploy_all
    from optinfer.services.store import Store

    cpus = split_cpus(generation_cpus, threads)
    model = IntegerModel(model_dir or INTEGER_DIR, threads=threads)  # the tokenizer, the spec
    rng = random.Random(seed)
    prompts = [model.encode(f"{rng.randint(1, 999)}+{rng.randint(1, 999)}=")
               for _ in range(requests)]
    with _thread_pinned(cpus and cpus.node), \
            tempfile.TemporaryDirectory(prefix="optinfer-bench-") as tmp, \
            start_anvil(block_time=block_time) as chain:
        w3 = connect(chain.url)
        deployer, provider, consumer = chain.accounts[0], chain.accounts[1], chain.accounts[3]
        log(f"deploying on {chain.url}")
        deployments = deploy_all(w3, deployer)
        store = Store(f"sqlite:///{Path(tmp) / 'provider.db'}")
        store.migrate()
        # As `optinfer provider run` serves: generation in a process of its own.
        generator = GenerationProcess(model.dir, threads=threads,
                                      cpus=cpus and cpus.generation)
        node = ProviderNode(w3=w3, store=store, deployments=deployments, model=model,
                            account=provider, generator=generator)
        node.ensure_model_registered(register=True)
        coordinator = node.coordinator
        stake = (coordinator.parameter("minimumStake")
                 + requests * coordinator.parameter("stakePerClaim"))
        node.ensure_provider_registered(stake)
        generator.generate(prompts[0], max_tokens)  # warm the session up
        # Rounds alternate generation alone and serving, so that a change in the machine's
        # load during the run weighs on both sides alike.
        served = []
        alone, serving = _PhaseTimes(generator), _PhaseTimes(generator)
        batches = _batches(prompts, min(rounds, requests))
        for number, batch in enumerate(batches, 1):
            with alone.timed():
                for _ in generator.stream([(prompt, max_tokens) for prompt in batch]):
                    pass
            _post(coordinator, consumer, node.spec.model_id, batch, max_tokens)
            node.watch()
            with serving.timed():
                served += node.serve_pending()
            log(f"round {number}/{len(batches)}: {len(batch)} requests, generation alone "
                f"{alone.phases[-1].wall_s:.2f} s, serving {serving.phases[-1].wall_s:.2f} s")
        rounds_timed = list(zip(alone.phases, serving.phases, strict=True))
        per_round = [(a.wall_s, s.wall_s) for a, s in rounds_timed]
        generation_s, serve_s = alone.total("wall_s"), serving.total("wall_s")
        log(f"served {len(served)} requests: {serve_s:.2f} s, generation alone "
            f"{generation_s:.2f} s")
        generator.close()
        store.dispose()
    if len(served) != requests:
        raise RuntimeError(f"served {len(served)} of {requests} requests")
    latencies = [s.latency_s for s in served]
    commits = [s.commit_s for s in served]
    return {
        "overhead": round(serve_s / generation_s, 4),
        "requests": requests,
        "max_tokens": max_tokens,
        "tokens": sum(s.tokens for s in served),
        "generation_s": round(generation_s, 4),
        "overhead_interval_95": overhead_interval(per_round),
        "rounds": len(per_round),
        "per_round": [{"generation_s": round(a.wall_s, 4),
                       "serve_with_commit_s": round(s.wall_s, 4),
                       "on_cpu_s": None if a.on_cpu_s is None or s.on_cpu_s is None else
                       {"alone": round(a.on_cpu_s, 4), "serving": round(s.on_cpu_s, 4)}}
                      for a, s in rounds_timed],
        "serve_with_commit_s": round(serve_s, 4),
        "commit_s": {"mean": round(statistics.mean(commits), 4),
                     "max": round(max(commits), 4)},
        "latency_s": {"p50": round(statistics.median(latencies), 4),
                      "max": round(max(latencies), 4)},
        "per_request": [{"request_id": s.request_id, "tokens": s.tokens,
                         "generate_s": round(s.generate_s, 4), "commit_s": round(s.commit_s, 4),
                         "latency_s": round(s.latency_s, 4)} for s in served],
        "overhead_off_cpu": overhead_off_cpu(alone, serving),
        "generation_process": {"alone": alone.report(), "serving": serving.report()},
        "model": str(model.dir),
        "threads": threads,
        "generation_cpus": sorted(cpus.generation) if cpus else None,
        "serving_cpus": sorted(cpus.node) if cpus else None,
        "block_time_s": block_time,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }


class SideTimes(NamedTuple):
    """One timed stretch of one side's work: its wall time, and the generation process's time
    on a CPU and runnable but off one (None where the kernel does not report them)."""

    wall_s: float
    on_cpu_s: float | None
    waiting_for_cpu_s: float | None


class _PhaseTimes:
    """One side's phases, timed."""

    def __init__(self, generator: GenerationProcess):
        self.generator = generator
        self.phases: list[SideTimes] = []

    @contextmanager
    def timed(self) -> Iterator[None]:
        before, started = self.generator.scheduler_times(), time.perf_counter()
        yield
        wall, after = time.perf_counter() - started, self.generator.scheduler_times()
        if before is None or after is None:
            self.phases.append(SideTimes(wall, None, None))
        else:
            self.phases.append(SideTimes(wall, after.on_cpu_s - before.on_cpu_s,
                                     after.waiting_for_cpu_s - before.waiting_for_cpu_s))

    def total(self, field: str) -> float | None:
        values = [getattr(phase, field) for phase in self.phases]
        return None if None in values else sum(values)

    def report(self) -> dict:
        return {field: None if (value := self.total(field)) is None else round(value, 4)
                for field in SideTimes._fields}


def overhead_off_cpu(alone: _PhaseTimes, serving: _PhaseTimes) -> float | None:
    """The overhead counted in the generation process's wall time per second on a CPU: its
    time off a CPU (waiting for one, or for work) while serving, against alone. The host's
    speed scales both its CPU and its wall time, so this does not move with it; it leaves out
    what the serving's work does to the generation's speed on its CPU (shared caches and
    memory), which only ``overhead`` holds."""
    if alone.total("on_cpu_s") is None or serving.total("on_cpu_s") is None:
        return None
    per_cpu_second = [side.total("wall_s") / side.total("on_cpu_s") for side in (alone, serving)]
    return round(per_cpu_second[1] / per_cpu_second[0], 4)


@contextmanager
def _thread_pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """This thread, and what it starts meanwhile (anvil, the node's threads), on `cpus`."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    pin_this_thread(cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def overhead_interval(per_round: list[tuple[float, float]], resamples: int = 4000,
                      seed: int = 0) -> list[float] | None:
    """A 95% percentile-bootstrap interval of the overhead (sum of serving over sum of
    generation), resampling whole rounds: a round's two sides ran back to back, so a slow
    stretch of the machine weighs on both. None below 4 rounds, too few to resample."""
    if len(per_round) < 4:
        return None
    rng = np.random.default_rng(seed)
    times = np.array(per_round)
    picks = rng.integers(0, len(times), size=(resamples, len(times)))
    sums = times[picks].sum(axis=1)
    low, high = np.quantile(sums[:, 1] / sums[:, 0], [0.025, 0.975])
    return [round(float(low), 4), round(float(high), 4)]


def _post(coordinator: InferenceCoordinator, consumer, model_id: bytes,
          prompts: list[list[int]], max_tokens: int) -> None:
    """Post a request per prompt: all sent, then all waited for (on a chain with block times,
    one block takes them)."""
    from optinfer.contracts.sender import TxSender

    deadline = coordinator.w3.eth.get_block("latest")["timestamp"] + 3600
    fee = 10**15
    sender = TxSender(coordinator.w3, consumer)
    sent = [sender.submit(coordinator.post_request_tx(RequestSpec(
                model_id=model_id, prompt=prompt, max_tokens=max_tokens,
                commit_deadline=deadline), fee), coordinator.artifact)
            for prompt in prompts]
    for tx_hash in sent:
        sender.wait(tx_hash)


def _batches(items: list, count: int) -> list[list]:
    size = -(-len(items) // count)
    return [items[i:i + size] for i in range(0, len(items), size)]
