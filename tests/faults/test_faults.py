"""The fault-injection suite (issue 20): the whole stack as processes on anvil, faults injected
while requests flow, and after each run the invariants of :func:`harness.check_invariants`
(no false answer finalizes, every true answer finalizes, no fee is lost) and
:func:`harness.check_rows` (every node's database agrees with the chain, whichever node
filled it), with every request settled in bounded time (nothing stays blocked) and every node
stopped by SIGTERM within a few seconds.

Two profiles: ``quick`` (the default, in CI) runs each fault once; ``long``
(``OPTINFER_FAULTS_PROFILE=long make test``) runs each more often with more requests and a
noisier link.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import pytest

from optinfer.contracts.coordinator import Status

from .harness import (
    HONEST,
    LIAR,
    NODE_STOP_SECONDS,
    FaultStack,
    Node,
    build_stack,
    check_invariants,
    check_rows,
    settle,
    wait_until,
)
from .proxy import Faults

pytestmark = pytest.mark.xdist_group("faults")


@dataclass(frozen=True)
class Profile:
    rounds: int
    honest_per_round: int
    lies_per_round: int
    link: Faults  # the nodes' link to the chain while faults run


PROFILES = {
    "quick": Profile(rounds=1, honest_per_round=3, lies_per_round=1,
                     link=Faults(error=0.05, drop=0.05, delay=0.02)),
    "long": Profile(rounds=4, honest_per_round=6, lies_per_round=2,
                    link=Faults(error=0.15, drop=0.10, delay=0.1)),
}
PROFILE = PROFILES[os.environ.get("OPTINFER_FAULTS_PROFILE", "quick")]


@pytest.fixture
def stack(tmp_path, request) -> FaultStack:
    postgres_for = getattr(request, "param", ())
    built = build_stack(tmp_path, postgres_for=postgres_for, seed=len(request.node.name))
    yield built
    built.close()


def start_all(stack: FaultStack) -> None:
    for name in ("honest", "liar", "watchtower"):
        stack.start_node(name)
    for name in ("honest", "liar"):
        stack.wait_for_log(name, "serving model")
    stack.wait_for_log("watchtower", "eager mode")


def committed(stack: FaultStack, request_ids: list[int], timeout: float = 90) -> None:
    """Wait until each of `request_ids` has a claim on chain (or is settled)."""
    wait_until(lambda: all(stack.coordinator.get_request(r).status is not Status.OPEN
                           for r in request_ids), timeout, f"commits of {request_ids}",
               on_timeout=lambda: stack.nodes["honest"].log() + stack.nodes["liar"].log())


def stop_and_check(stack: FaultStack) -> None:
    """Heal, settle, stop every node with SIGTERM and check the invariants and the rows."""
    stack.faulty.faults = Faults()
    statuses = settle(stack)
    for name, (status, seconds) in stack.stop_all().items():
        assert status == 0, f"{name} exited {status}:\n{stack.nodes[name].log()[-3000:]}"
        assert seconds < NODE_STOP_SECONDS, f"{name} took {seconds:.1f} s to stop"
    check_invariants(stack, statuses)
    check_rows(stack, statuses, ("honest", "liar", "watchtower"))
    for name, node in stack.nodes.items():
        assert "Traceback" not in node.log(), f"{name}:\n{node.log()[-5000:]}"


def test_chain_faults_reorganisations_a_killed_chain_and_a_lossy_link(stack):
    """Points 1-3, 5 and 6 as they happen to a running stack: a reorganisation that takes
    every commit, verdict and game move since the requests were posted, and another that
    takes every game's end and every finalization; anvil killed
    with -9 and restarted from its last state dump (the blocks since lost, the nodes'
    transactions with them); all the while a link that errors, drops answers and delays; a
    chain that mines on a block time, so time passes with no traffic."""
    start_all(stack)
    stack.faulty.faults = PROFILE.link
    for round_ in range(PROFILE.rounds):
        offset = round_ * PROFILE.honest_per_round
        ids = (stack.post_many(PROFILE.honest_per_round, HONEST, offset)
               + stack.post_many(PROFILE.lies_per_round, LIAR, offset))
        posted = stack.w3.eth.block_number
        committed(stack, ids)
        time.sleep(1.0)  # the watchtower judges, challenges, the games begin
        # Every block since the last post: the requests stay, what answered them goes.
        stack.reorganise(depth=stack.w3.eth.block_number - posted)
        committed(stack, ids)  # committed again
        late = stack.post_many(2, HONEST, offset + 1)
        stack.restart_chain()
        # What the dump kept of `late` is served; what it lost is gone with its fee.
        committed(stack, [r for r in late if r in stack.requests()])
        # Every game played, every answer finalized or slashed; then a reorganisation takes
        # every finalization (the nodes' rows said finalized): they are sent again. (Only the
        # blocks after the clock moved: blocks that replace others carry about their times,
        # and a game's blocks replaced by blocks past the challenge window would be another
        # chain's history, not a reorganisation of this one.)
        settle(stack)
        stack.reorganise(depth=stack.w3.eth.block_number - stack.clock_moved_at)
    stop_and_check(stack)


@pytest.mark.parametrize("stack", [("honest",)], indirect=True)
def test_process_faults_killed_nodes_a_restarted_database_a_shared_key_and_an_empty_one(
        stack):
    """Points 4, 7 and 8 and the database: kill -9 of the watchtower and of the lying
    provider in the middle of their game, of the honest provider with answers in flight; the
    honest provider's Postgres restarted under it; a second process on the honest provider's
    key; the honest provider restarted on an empty database (it must not answer history)."""
    start_all(stack)
    stack.faulty.faults = PROFILE.link
    for round_ in range(PROFILE.rounds):
        offset = round_ * PROFILE.honest_per_round
        games_before = len(stack.games())
        lies = stack.post_many(PROFILE.lies_per_round, LIAR, offset)
        honest = stack.post_many(PROFILE.honest_per_round, HONEST, offset)
        wait_until(lambda before=games_before: len(stack.games()) > before, 90,
                   "a game", on_timeout=lambda: stack.nodes["watchtower"].log())
        time.sleep(0.5)  # a few moves in
        stack.nodes["watchtower"].kill()
        stack.nodes["liar"].kill()
        stack.nodes["honest"].kill()
        logged = len(stack.nodes["honest"].log())
        stack.start_node("watchtower")
        stack.start_node("liar")
        stack.start_node("honest")
        committed(stack, lies + honest)

        # The database restarted under a running node (after its start, not during it).
        stack.wait_for_log("honest", "serving model", after=logged)
        stack.postgres.restart()
        committed(stack, stack.post_many(2, HONEST, offset + 2))

    # Two processes on one key: a second honest node with a database of its own. Whichever
    # finds its nonce taken stops with one line; the stack goes on either way.
    stack.databases["honest-2"] = f"sqlite:///{stack.directory / 'honest-2.db'}"
    twin = stack.nodes["honest"]
    stack.nodes["honest-2"] = Node("honest-2", twin.args,
                                   {**twin.env,
                                    "OPTINFER_DATABASE_URL": stack.databases["honest-2"]},
                                   stack.directory / "honest-2.log")
    stack.wait_for_log("honest-2", "serving model")
    committed(stack, stack.post_many(3, HONEST, 5))
    for name in ("honest", "honest-2"):
        node = stack.nodes[name]
        if not node.running():
            assert node.process.returncode == 2, node.log()[-3000:]
            assert "error: another process is sending transactions from" in node.log()
    for name in ("honest", "honest-2"):
        stack.nodes[name].stop()
    del stack.nodes["honest-2"]

    # A fresh database: history is read, not answered again.
    stack.databases["honest"] = f"sqlite:///{stack.directory / 'honest-fresh.db'}"
    stack.nodes["honest"].env["OPTINFER_DATABASE_URL"] = stack.databases["honest"]
    history = set(stack.requests())
    log_before = len(stack.nodes["honest"].log())
    stack.nodes["honest"].start()
    new = stack.post_many(2, HONEST, 3)
    committed(stack, new)
    served = {int(n) for n in re.findall(r"served request (\d+):",
                                         stack.nodes["honest"].log()[log_before:])}
    assert not served & history, f"history answered again: {served & history}"
    stop_and_check(stack)
