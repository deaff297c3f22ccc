"""Serving: the serve/skip decision, requests served end to end by `optinfer provider run`
(registration, commit, finalization, the consumer's callback), requests it cannot serve, and
kill -9 around the commit."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import sqlalchemy as sa

from optinfer.contracts.coordinator import ZERO_ADDRESS, QuestionAsker, RequestSpec, Status
from optinfer.contracts.registry import MAX_ONE_STEP_FAN_IN_BYTES
from optinfer.contracts.sender import TxDropped, TxSender
from optinfer.errors import UserError
from optinfer.services import store as st
from optinfer.services.events import block_hash
from optinfer.services.provider import (
    Prepared,
    ProviderNode,
    ServedModel,
    claimed_output,
    serve_decision,
)
from optinfer.services.settings import load_settings
from optinfer.services.statuses import RequestStatus
from optinfer.services.store import RequestRecord, Store

from .conftest import FEE, MAX_TOKENS, PROMPT_TEXT, optinfer

PROVIDER = "0x" + "11" * 20
T = TypeVar("T")
MODEL = ServedModel(model_id="0x" + "ab" * 32, max_context=128, vocab_size=18)


def _request(**changes) -> RequestRecord:
    values = dict(request_id=1, consumer="0x" + "22" * 20, model_id=MODEL.model_id,
                  prompt=[1, 6, 7], max_tokens=32, fee=FEE, callback=ZERO_ADDRESS,
                  callback_gas_limit=0, named_provider=ZERO_ADDRESS, commit_deadline=1000,
                  block_number=1, tx_hash="0x" + "00" * 32)
    values.update(changes)
    return RequestRecord(**values)


# ----------------------------------------------------------------------- pure decisions


def test_serve_decision_serves_open_requests_and_its_named_ones():
    assert serve_decision(_request(), MODEL, PROVIDER, now=999) is None
    assert serve_decision(_request(named_provider=PROVIDER.upper().replace("0X", "0x")),
                          MODEL, PROVIDER, now=1000) is None
    # The longest request that fits: prompt + max_tokens - 1 == max_context.
    assert serve_decision(_request(prompt=[1] * 29, max_tokens=100), MODEL, PROVIDER, 0) is None


@pytest.mark.parametrize(("changes", "now", "reason"), [
    ({"model_id": "0x" + "cd" * 32}, 0, r"model 0xcdcd.* is not the one this node serves"),
    ({"named_provider": "0x" + "33" * 20}, 0, r"named to another provider, 0x3333"),
    ({"prompt": [1] * 30, "max_tokens": 100}, 0,
     r"prompt \(30 tokens\) plus max tokens \(100\) exceed the model's context of 128"),
    ({"prompt": [1, 18]}, 0, r"prompt token 18 is outside the vocabulary \(0..17\)"),
    ({}, 1001, r"its commit deadline 1000 has passed \(chain time 1001\)"),
])
def test_serve_decision_names_why_it_skips(changes, now, reason):
    assert re.match(reason, serve_decision(_request(**changes), MODEL, PROVIDER, now))


def test_the_lie_changes_only_the_last_answer_token_and_only_when_asked():
    eos = (2,)
    assert claimed_output([5, 9, 2], "off", 18, eos) == [5, 9, 2]
    # The last token before EOS changes, never into an EOS; EOS stays the last token.
    assert claimed_output([5, 9, 2], "last-token", 18, eos) == [5, 10, 2]
    assert claimed_output([5, 1, 2], "last-token", 18, eos) == [5, 3, 2]
    assert claimed_output([5, 9, 17], "last-token", 18, eos) == [5, 9, 0]  # max tokens, no EOS
    with pytest.raises(ValueError):
        claimed_output([1], "first-token", 18)


# ----------------------------------------------------------------------- in-process node


def _node(protocol, database_url: str, model) -> ProviderNode:
    store = Store(database_url)
    store.migrate()
    return ProviderNode(w3=protocol.w3, store=store, deployments=protocol.deployments,
                        model=model, account=protocol.provider, poll_interval=0.2)


def test_register_refuses_a_model_with_a_one_step_beyond_one_transaction_point8(
        protocol, database_url, model):
    """--register checks what the registry cannot: a model whose largest per-element fan-in
    would make a one-step witness too large for one transaction is not registered at all."""
    node = _node(protocol, database_url, model)
    too_wide = MAX_ONE_STEP_FAN_IN_BYTES + 1
    node.spec = dataclasses.replace(node.spec, max_fan_in_bytes=too_wide)
    with pytest.raises(UserError, match=f"cannot be registered: one element of this model "
                                        f"depends on {too_wide} input bytes"):
        node.ensure_model_registered(register=True)
    assert not protocol.registry.is_registered(node.spec.model_id)


def test_a_squatters_registration_does_not_stand_for_the_node_s_model_point5(
        protocol, database_url, model, tiny_spec):
    """The model's roots registered first with other EOS ids are another model: the node
    still finds its own unregistered, and registers it."""
    squatter = dataclasses.replace(tiny_spec, eos_token_ids=(), manifest_uri="squatter")
    protocol.registry.register_send(squatter, protocol.accounts[4])
    node = _node(protocol, database_url, model)
    with pytest.raises(UserError, match="is not registered"):
        node.ensure_model_registered(register=False)
    node.ensure_model_registered(register=True)
    registered = protocol.registry.get_model(bytes.fromhex(node.served_model.model_id[2:]))
    # The node's own fields (its URI is its manifest's file:// one, not the fixture's).
    assert registered.model_id == tiny_spec.model_id and registered.spec.eos_token_ids == (2,)
    assert registered.registrant == protocol.provider.address


def test_requests_it_cannot_serve_are_skipped_with_the_reason_logged(registered, database_url,
                                                                     model, tiny_spec, caplog):
    """Another model, another provider's request, a token outside the vocabulary and a passed
    deadline are left alone, each with its reason in the log and the database; the one
    servable request is answered with the model's greedy output."""
    protocol = registered
    other = dataclasses.replace(tiny_spec, constants_root=b"\x42" * 32)
    protocol.registry.register_send(other, protocol.accounts[0])
    node = _node(protocol, database_url, model)
    node.ensure_model_registered(register=False)
    node.ensure_provider_registered(None)
    prompt = model.encode(PROMPT_TEXT)
    ids = {
        "other model": protocol.post(prompt, model_id=other.model_id),
        "named": protocol.post(prompt, named_provider=protocol.accounts[5].address),
        "vocabulary": protocol.post([1, model.vocab_size + 3]),
        "deadline": protocol.post(prompt, deadline_in=5),
        "served": protocol.post(prompt),
    }
    protocol.advance(10)
    with caplog.at_level(logging.INFO, logger="optinfer.provider"):
        served = node.poll_once()
    assert [s.request_id for s in served] == [ids["served"]]
    expected = {
        "other model": f"model 0x{other.model_id.hex()} is not the one this node serves",
        "named": f"named to another provider, {protocol.accounts[5].address}",
        "vocabulary": f"prompt token {model.vocab_size + 3} is outside the vocabulary",
        "deadline": "its commit deadline",
    }
    with node.store.transaction() as conn:
        for what, fragment in expected.items():
            record = st.get_request(conn, ids[what])
            assert record.status == "skipped" and fragment in record.note, what
            assert f"skipped request {ids[what]}: {record.note}" in caplog.text
        answered = st.get_request(conn, ids["served"])
        claim = st.get_claim(conn, ids["served"])
    assert answered.status == "committed"
    assert answered.output == claim.output == model.generate(prompt, MAX_TOKENS)
    assert protocol.coordinator.get_output(ids["served"]) == answered.output
    for what in expected:
        assert protocol.coordinator.get_request(ids[what]).status is Status.OPEN
    # Polling again changes nothing: each request was handled once.
    assert node.poll_once() == []
    node.store.dispose()


def test_start_up_refuses_an_unregistered_model_with_one_clear_message(protocol):
    settings = load_settings(rpc_url=protocol.w3.provider.endpoint_uri,
                             deployments=protocol.file)
    with pytest.raises(UserError, match=r"is not registered in the ModelRegistry at 0x.*"
                                        r"pass --register"):
        ProviderNode.start(settings)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_the_generation_process_and_the_serving_thread_get_cpus_of_their_own(registered):
    settings = load_settings(rpc_url=registered.w3.provider.endpoint_uri,
                             deployments=registered.file)
    everything = frozenset(os.sched_getaffinity(0))
    node = ProviderNode.start(settings)  # generation_cpus defaults to auto
    try:
        last = max(everything)
        assert node.generator.cpus == {last} and node.serving_cpus == everything - {last}
        assert os.sched_getaffinity(node.generator._process.pid) == {last}
        # run() serves on a thread of the node's CPUs (the committer and the confirmer are
        # started from it, and inherit them); its own thread keeps every CPU.
        seen: list[set[int]] = []
        stop = threading.Event()

        def serve_pending():
            seen.append(os.sched_getaffinity(0))
            stop.set()
            return []

        node.serve_pending = serve_pending
        node.run(stop)
        assert seen == [everything - {last}]
        assert os.sched_getaffinity(0) == everything
    finally:
        node.close()
    unpinned = ProviderNode.start(load_settings(
        rpc_url=registered.w3.provider.endpoint_uri, deployments=registered.file,
        generation_cpus="none"))
    try:
        assert unpinned.generator.cpus is None and unpinned.serving_cpus is None
        assert os.sched_getaffinity(unpinned.generator._process.pid) == everything
    finally:
        unpinned.close()


def test_generation_cpus_the_machine_lacks_stop_the_start_with_one_clear_message(registered):
    settings = load_settings(rpc_url=registered.w3.provider.endpoint_uri,
                             deployments=registered.file, generation_cpus="4096")
    with pytest.raises(UserError, match=r"generation_cpus '4096': CPU 4096 is not available "
                                        r"to this process \(it may use [0-9,]+\)"):
        ProviderNode.start(settings)
    run = optinfer("provider", "run", "--generation-cpus", "0-4096", env={
        "OPTINFER_RPC_URL": registered.w3.provider.endpoint_uri,
        "OPTINFER_DEPLOYMENTS": str(registered.file)})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "generation_cpus '0-4096': CPU" in run.stderr and run.stderr.count("\n") == 1


# ------------------------------------------------------------------------- as it is run


def test_a_request_is_served_committed_finalized_and_called_back(protocol, postgres_url,
                                                                 run_provider, model):
    """End to end on Postgres: `provider run` refuses the unregistered model, then with
    --register registers it and stakes; a QuestionAsker request is answered, committed and,
    after the challenge window, finalized by the node, with the answer delivered to the
    consumer contract."""
    refused = optinfer("provider", "run", env={
        "OPTINFER_RPC_URL": protocol.w3.provider.endpoint_uri,
        "OPTINFER_DEPLOYMENTS": str(protocol.file), "OPTINFER_DATABASE_URL": postgres_url})
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "pass --register" in refused.stderr

    node = run_provider(protocol, postgres_url, "--register")
    started = node.wait_for(r"serving model 0x[0-9a-f]{64}.*\n").group(0).rstrip()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:  # pinned by default: the generation on the last CPU
        assert started.endswith(f"generating on CPU {cpus[-1]}, serving on "
                                + ",".join(map(str, cpus[:-1])))
    assert protocol.registry.is_registered(protocol.model_id)
    minimum = protocol.coordinator.parameter("minimumStake")
    assert protocol.coordinator.provider_stake(protocol.provider.address) == (minimum, 0)

    asker = QuestionAsker.deploy(protocol.w3, protocol.consumer, protocol.coordinator.address)
    prompt = model.encode(PROMPT_TEXT)
    request = RequestSpec(model_id=protocol.model_id, prompt=prompt, max_tokens=MAX_TOKENS,
                          commit_deadline=protocol.now() + 600, callback_gas_limit=300_000)
    receipt = asker.ask_send(request, FEE, protocol.consumer)
    request_id = protocol.coordinator.events(receipt, "RequestPosted")[0]["requestId"]
    served = node.wait_for(rf"served request {request_id}: (\d+) tokens .* committed in tx "
                           r"(0x[0-9a-f]{64})")
    answer = model.generate(prompt, MAX_TOKENS)
    assert int(served.group(1)) == len(answer)
    assert protocol.coordinator.get_output(request_id) == answer
    assert not asker.answered(request_id)

    protocol.advance(protocol.coordinator.parameter("challengeWindow"))
    node.wait_for(rf"finalized request {request_id}: fee {FEE} wei credited, callback delivered")
    assert asker.answered(request_id) and asker.answer(request_id) == answer
    assert protocol.coordinator.get_request(request_id).status is Status.FINALIZED
    assert protocol.coordinator.balance_of(protocol.provider.address) == FEE
    assert node.stop() == 0
    store = Store(postgres_url)
    with store.transaction() as conn:
        assert st.get_request(conn, request_id).status == "finalized"
        assert st.get_claim(conn, request_id).status == "finalized"
    store.dispose()


def test_issue21_requests_decode_together_and_each_commits_as_it_finishes(
        registered, sqlite_url, run_provider, model):
    """`provider run --max-batch 4` with a long request posted first and short ones after
    it: they decode together, the short answers are committed before the long one, and every
    answer on chain is the model's alone."""
    protocol = registered
    long_prompt, short_prompt = model.encode("12+34="), model.encode("7+8=")
    long_id = protocol.post(long_prompt, max_tokens=MAX_TOKENS)
    short_ids = [protocol.post(short_prompt, max_tokens=2) for _ in range(3)]
    node = run_provider(protocol, sqlite_url, "--max-batch", "4", "--stake", str(2 * 10**18))
    for request_id in (long_id, *short_ids):
        node.wait_for(rf"served request {request_id}: ")
    log = node.log()
    assert all(log.index(f"served request {i}: ") < log.index(f"served request {long_id}: ")
               for i in short_ids)
    assert protocol.coordinator.get_output(long_id) == model.generate(long_prompt, MAX_TOKENS)
    assert all(protocol.coordinator.get_output(i) == model.generate(short_prompt, 2)
               for i in short_ids)
    assert node.stop() == 0


@pytest.mark.parametrize("crash_at", ["before-commit", "after-commit"])
def test_kill_9_around_the_commit_then_restart_serves_the_request_exactly_once(
        registered, sqlite_url, run_provider, model, crash_at):
    """The node dies (SIGKILL) right before sending the commit, or right after sending it and
    before recording it; restarted, it finds the `committing` row, asks the chain, and commits
    exactly once in all."""
    protocol = registered
    stake = 3 * 10**18
    first = run_provider(protocol, sqlite_url, "--stake", str(stake),
                         env={"OPTINFER_CRASH_AT": crash_at})
    first.wait_for(rf"registered provider 0x[0-9a-fA-F]{{40}} with stake {stake} wei")
    first.wait_for("serving model")
    provider = protocol.provider.address
    assert protocol.coordinator.provider_stake(provider) == (stake, 0)
    nonce_at_start = protocol.w3.eth.get_transaction_count(provider)  # after registering
    prompt = model.encode(PROMPT_TEXT)
    request_id = protocol.post(prompt)
    assert first.wait_exit() == -9
    store = Store(sqlite_url)
    with store.transaction() as conn:
        row = st.get_request(conn, request_id)
    answer = model.generate(prompt, MAX_TOKENS)
    assert (row.status, row.output) == ("committing", answer)
    committed_before_restart = protocol.coordinator.get_request(request_id).status
    assert committed_before_restart is (Status.OPEN if crash_at == "before-commit"
                                        else Status.COMMITTED)

    second = run_provider(protocol, sqlite_url)
    if crash_at == "before-commit":
        second.wait_for(rf"served request {request_id}: ")
    else:
        second.wait_for(rf"request {request_id}: already committed by this node")
    assert second.stop() == 0
    assert protocol.w3.eth.get_transaction_count(provider) == nonce_at_start + 1
    commits = protocol.coordinator.contract.events.OutputCommitted().get_logs(
        argument_filters={"requestId": request_id}, from_block=0)
    assert len(commits) == 1 and list(commits[0]["args"]["output"]) == answer
    with store.transaction() as conn:
        assert st.get_request(conn, request_id).status == "committed"
        assert st.get_claim(conn, request_id).tx_hash == "0x" + bytes(
            commits[0]["transactionHash"]).hex()
    store.dispose()


def test_a_commit_still_pending_at_a_restart_is_waited_for_not_sent_again(
        registered, sqlite_url, run_provider, model):
    """As on a chain with block times: the node dies right after sending its commit, which
    is not mined yet. Restarted, it finds the transaction it recorded pending and waits for
    it; one commit transaction in all (a second could only revert and cost gas)."""
    protocol, w3 = registered, registered.w3
    provider = protocol.provider.address
    first = run_provider(protocol, sqlite_url, "--stake", str(3 * 10**18),
                         env={"OPTINFER_CRASH_AT": "after-commit"})
    first.wait_for("serving model")
    nonce_at_start = w3.eth.get_transaction_count(provider)  # after registering
    prompt = model.encode(PROMPT_TEXT)
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        request = RequestSpec(model_id=protocol.model_id, prompt=prompt,
                              max_tokens=MAX_TOKENS, commit_deadline=protocol.now() + 600)
        post = TxSender(w3, protocol.consumer).submit(
            {"to": protocol.coordinator.address, "value": FEE,
             "data": protocol.coordinator.calldata("postRequest", *request.as_args())})
        w3.provider.make_request("evm_mine", [])
        (posted,) = protocol.coordinator.events(w3.eth.get_transaction_receipt(post),
                                                "RequestPosted")
        request_id = posted["requestId"]
        assert first.wait_exit() == -9  # after sending its commit
        store = Store(sqlite_url)
        with store.transaction() as conn:
            row = st.get_request(conn, request_id)
        assert row.status == "committing" and row.commit_tx is not None
        assert w3.eth.get_transaction(row.commit_tx)["blockNumber"] is None  # pending
        assert protocol.coordinator.get_request(request_id).status is Status.OPEN

        second = run_provider(protocol, sqlite_url)
        second.wait_for(rf"request {request_id}: its commit {row.commit_tx}, sent before the "
                        "restart, is known to the node; waiting for it")
        w3.provider.make_request("evm_mine", [])
        second.wait_for(rf"served request {request_id}: .* committed in tx {row.commit_tx}")
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    assert second.stop() == 0
    assert w3.eth.get_transaction_count(provider) == nonce_at_start + 1
    with store.transaction() as conn:
        assert st.get_request(conn, request_id).status == "committed"
        assert st.get_claim(conn, request_id).tx_hash == row.commit_tx
    store.dispose()


def test_rpc_faults_lose_nothing_and_send_nothing_twice(registered, sqlite_url, model, chain):
    """Between the node and anvil, a proxy refuses and drops requests: a commit whose answer is
    lost is recognised, not sent again; a node unreachable for a whole commit leaves the
    request `committing`, and the next poll finishes it. Every request is committed once."""
    from optinfer.services.chain import RetryPolicy, RpcUnavailable, connect
    from tests.services.rpc_proxy import RpcProxy

    protocol = registered
    prompt = model.encode(PROMPT_TEXT)
    ids = [protocol.post(prompt), protocol.post(prompt, max_tokens=12)]
    provider = protocol.provider.address
    with RpcProxy(chain.url) as proxy:
        store = Store(sqlite_url)
        store.migrate()
        node = ProviderNode(w3=connect(proxy.url, RetryPolicy(attempts=3, initial_delay=0.01)),
                            store=store, deployments=protocol.deployments, model=model,
                            account=protocol.provider, poll_interval=0.2)
        node.ensure_provider_registered(None)
        nonce = protocol.w3.eth.get_transaction_count(provider)
        proxy.fail("eth_getLogs", "lose")  # the cursor's first read: retried
        proxy.fail("eth_sendRawTransaction", "refuse", times=3)  # the first commit: given up
        with pytest.raises(RpcUnavailable):
            node.poll_once()
        with store.transaction() as conn:
            # The second answer, generated meanwhile, went out with the nonce left unused.
            assert [st.get_request(conn, i).status for i in ids] == ["committing", "committed"]
        proxy.fail("eth_sendRawTransaction", "lose", times=2)  # sent, but no answer: twice
        proxy.fail("eth_getTransactionReceipt", "lose")
        served = node.poll_once()
        assert [s.request_id for s in served] == ids[:1]
        # The first commit reached anvil more than once, always as the same signed
        # transaction: the nonces below count the transactions that exist.
        assert proxy.forwarded["eth_sendRawTransaction"] >= 4
    assert protocol.w3.eth.get_transaction_count(provider) == nonce + 2
    for request_id in ids:
        commits = protocol.coordinator.contract.events.OutputCommitted().get_logs(
            argument_filters={"requestId": request_id}, from_block=0)
        assert len(commits) == 1
    with store.transaction() as conn:
        assert [st.get_request(conn, i).status for i in ids] == ["committed", "committed"]
    store.dispose()


def _in_process_node(protocol, database_url: str, model, stake: int | None) -> ProviderNode:
    """A registered node that has recorded the requests posted so far."""
    node = _node(protocol, database_url, model)
    node.ensure_provider_registered(stake)
    node.watch()
    return node


@contextlib.contextmanager
def _blocks_on_demand(w3):
    """No automatic mining: a transaction waits in the pool until the test mines a block."""
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        yield
    finally:
        w3.provider.make_request("evm_setAutomine", [True])


def _wait_for_pending(w3, address: str, nonce: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while w3.eth.get_transaction_count(address, "pending") < nonce:
        assert time.monotonic() < deadline, \
            f"{nonce - w3.eth.get_transaction_count(address, 'pending')} transactions never sent"
        time.sleep(0.05)


def one_block_for(w3, step: Callable[[], T], sender: str, transactions: int,
                  then: Callable[[], None] | None = None) -> T:
    """Run `step` with no automatic mining until `sender` has sent `transactions`
    transactions, none of them mined; then mine one block (or do `then` instead) and let
    `step` finish. Its result; its exception, if it raised."""
    nonce = w3.eth.get_transaction_count(sender)
    # Mining is back on before the step is waited for, so a failing check never leaves the
    # step waiting for a block that nobody mines.
    with ThreadPoolExecutor(1) as background, _blocks_on_demand(w3):
        running = background.submit(step)
        try:
            _wait_for_pending(w3, sender, nonce + transactions)
            assert w3.eth.get_transaction_count(sender) == nonce  # all sent, none mined
        finally:
            (then or (lambda: w3.provider.make_request("evm_mine", [])))()
    return running.result(timeout=120)


def test_commits_go_out_without_waiting_for_blocks_so_one_block_takes_them_all(
        registered, sqlite_url, model):
    """As on a chain that mines every few seconds: the node sends each answer's commit while
    the earlier ones are still pending, instead of one commit per block."""
    protocol, w3 = registered, registered.w3
    prompt = model.encode(PROMPT_TEXT)
    ids = [protocol.post(prompt, max_tokens=8) for _ in range(3)]
    node = _in_process_node(protocol, sqlite_url, model, stake=2 * 10**18)
    served = one_block_for(w3, node.serve_pending, protocol.provider.address, 3)
    assert [s.request_id for s in served] == ids
    blocks = {w3.eth.get_transaction(s.tx_hash)["blockNumber"] for s in served}
    assert len(blocks) == 1
    with node.store.transaction() as conn:
        assert [st.get_request(conn, i).status for i in ids] == ["committed"] * 3
    node.store.dispose()


def test_a_commit_that_fails_in_its_block_keeps_its_answer_until_the_chain_refuses_it(
        registered, sqlite_url, model, caplog):
    """A commit sent while its request could still be answered, then mined in a block past
    the commit deadline, fails there with the request still open on chain. The node keeps
    the answer (``committing``, the failed transaction forgotten) instead of calling the
    request settled; the next pass estimates the commit again, which now reverts, so the
    request is skipped with the reason and nothing more is sent."""
    protocol, w3 = registered, registered.w3
    request_id = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8, deadline_in=600)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)
    provider = protocol.provider.address
    nonce = w3.eth.get_transaction_count(provider)
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        # The block that takes the commit is past the deadline.
        served = one_block_for(w3, node.serve_pending, provider, 1,
                               then=lambda: protocol.advance(700))
    assert served == []
    assert re.search(rf"request {request_id}: cannot commit yet \(transaction 0x[0-9a-f]+ "
                     "failed in block", caplog.text)
    with node.store.transaction() as conn:
        kept = st.get_request(conn, request_id)
    assert kept.status == "committing" and kept.commit_tx is None and kept.output
    assert protocol.coordinator.get_request(request_id).status is Status.OPEN

    assert node.serve_pending() == []
    with node.store.transaction() as conn:
        skipped = st.get_request(conn, request_id)
    assert skipped.status == "skipped" and "CommitDeadlinePassed" in skipped.note
    assert w3.eth.get_transaction_count(provider) == nonce + 1
    node.store.dispose()


def test_an_answer_to_retry_whose_request_was_settled_meanwhile_is_left_alone(
        registered, sqlite_url, model, caplog):
    """A commit to retry later keeps its answer in one transaction, unless the request has
    been settled meanwhile: then nothing is written and the serving pass goes on."""
    protocol = registered
    settled, open_one = (protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
                         for _ in range(2))
    node = _node(protocol, sqlite_url, model)
    node.watch()
    with node.store.transaction() as conn:
        assert st.set_request_status(conn, settled, RequestStatus.SKIPPED, note="elsewhere")
        assert st.set_request_status(conn, open_one, RequestStatus.COMMITTING,
                                     output=[5], commit_tx="0x" + "ab" * 32)
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        node._retry_later(Prepared(settled, [1, 2], time.perf_counter()), RuntimeError("x"))
        node._retry_later(Prepared(open_one, [3, 4], time.perf_counter()), RuntimeError("y"))
    with node.store.transaction() as conn:
        left, kept = st.get_request(conn, settled), st.get_request(conn, open_one)
    assert (left.status, left.note, left.output) == ("skipped", "elsewhere", None)
    assert kept.status == "committing" and kept.output == [3, 4] and kept.commit_tx is None
    assert f"request {settled}:" not in caplog.text
    assert f"request {open_one}: cannot commit yet (y); will retry" in caplog.text
    node.store.dispose()


def test_a_commit_the_node_drops_is_sent_again_with_its_nonce(registered, sqlite_url, model):
    """The chain node drops the pending commit (as a restarted node loses its pool): the node
    sees it gone, keeps the answer, and the next pass sends the commit again with the same
    nonce, not one past a gap that nothing would fill."""
    protocol, w3 = registered, registered.w3
    request_id = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)
    provider = protocol.provider.address
    nonce = w3.eth.get_transaction_count(provider)
    assert one_block_for(w3, node.serve_pending, provider, 1, then=lambda: w3.provider.make_request(
        "anvil_dropAllTransactions", [])) == []
    with node.store.transaction() as conn:
        kept = st.get_request(conn, request_id)
    assert kept.status == "committing" and kept.commit_tx is None

    (served,) = node.serve_pending()
    assert served.request_id == request_id
    assert w3.eth.get_transaction(served.tx_hash)["nonce"] == nonce
    commits = protocol.coordinator.contract.events.OutputCommitted().get_logs(
        argument_filters={"requestId": request_id}, from_block=0)
    assert len(commits) == 1
    node.store.dispose()


def test_claims_due_are_finalized_in_one_block_not_one_each(registered, sqlite_url, model):
    """Every finalize is sent before any is waited for, so the loop that also plays the
    games is not held for a block per claim on a chain with block times."""
    protocol, w3 = registered, registered.w3
    ids = [protocol.post(model.encode(PROMPT_TEXT), max_tokens=8) for _ in range(3)]
    node = _in_process_node(protocol, sqlite_url, model, stake=2 * 10**18)
    assert [s.request_id for s in node.serve_pending()] == ids
    protocol.advance(protocol.coordinator.parameter("challengeWindow") + 1)
    provider = protocol.provider.address
    nonce, before = w3.eth.get_transaction_count(provider), w3.eth.block_number
    one_block_for(w3, node.finalize_due, provider, 3)
    assert w3.eth.get_transaction_count(provider, before + 1) == nonce + 3
    assert all(protocol.coordinator.get_request(i).status is Status.FINALIZED for i in ids)
    with node.store.transaction() as conn:
        assert [st.get_request(conn, i).status for i in ids] == ["finalized"] * 3
    node.store.dispose()


def test_issue20_point2_one_orphaned_claim_does_not_hold_up_the_others(registered, sqlite_url,
                                                                       model, caplog):
    """A claim row whose request the chain no longer has (a reorganisation took it) makes
    `getRequest` revert with RequestNotFound: it is logged and left for later, and every
    other claim due is still finalized."""
    protocol = registered
    ids = [protocol.post(model.encode(PROMPT_TEXT), max_tokens=8) for _ in range(2)]
    node = _in_process_node(protocol, sqlite_url, model, stake=2 * 10**18)
    assert [s.request_id for s in node.serve_pending()] == ids
    orphan = 0  # ids run from 1: the coordinator never had it; it comes first in the loop
    with node.store.transaction() as conn:
        real = st.get_request(conn, ids[0])
        st.upsert_request(conn, dataclasses.replace(real, request_id=orphan,
                                                    tx_hash="0x" + "0f" * 32))
        st.set_request_status(conn, orphan, RequestStatus.COMMITTED, expected=None)
        st.record_claim(conn, dataclasses.replace(st.get_claim(conn, ids[0]),
                                                  request_id=orphan, tx_hash="0x" + "0e" * 32))
    protocol.advance(protocol.coordinator.parameter("challengeWindow") + 1)
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        node.finalize_due()
    assert f"request {orphan}: not finalized (RequestNotFound)" in caplog.text
    assert all(protocol.coordinator.get_request(i).status is Status.FINALIZED for i in ids)
    node.store.dispose()


def test_issue20_point2_a_commit_a_reorganisation_took_is_committed_again(registered, sqlite_url,
                                                                          model, caplog):
    """A reorganisation takes the block holding the node's commit (the request itself stays):
    the node's next poll finds its claim's block without it, counts its nonces anew and commits
    the same answer again, instead of leaving the row `committed` forever and its next
    transactions stranded behind the nonce gap; the claim is then finalized."""
    protocol, w3 = registered, registered.w3
    request_id = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    assert [s.request_id for s in node.serve_pending()] == [request_id]
    answer = protocol.coordinator.get_output(request_id)
    lost_height = w3.eth.block_number
    w3.provider.make_request("evm_revert", [fork])
    while w3.eth.block_number <= lost_height:
        w3.provider.make_request("evm_mine", [])
    assert protocol.coordinator.get_request(request_id).status is Status.OPEN
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        node.poll_once()
    # Noticed by the requests cursor reading the block the receipt named.
    assert f"requests {request_id}: the blocks" in caplog.text, caplog.text
    assert protocol.coordinator.get_request(request_id).status is Status.COMMITTED
    assert protocol.coordinator.get_output(request_id) == answer
    with node.store.transaction() as conn:
        claim = st.get_claim(conn, request_id)
        assert st.get_request(conn, request_id).status is RequestStatus.COMMITTED
    assert claim.block_hash == block_hash(w3, claim.block_number)  # recorded from the new one
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        caplog.clear()
        node.watch()
    assert "no longer hold" not in caplog.text  # the new commit is the chain's
    with node.store.transaction() as conn:
        assert st.get_claim(conn, request_id) == claim
    protocol.advance(protocol.coordinator.parameter("challengeWindow") + 1)
    node.finalize_due()
    assert protocol.coordinator.get_request(request_id).status is Status.FINALIZED
    node.store.dispose()


def test_issue20_point1_a_finalization_read_from_the_chain_leaves_with_its_block(
        registered, sqlite_url, model, caplog):
    """Anyone may finalize a claim: the node finds its claim finalized on chain without a
    receipt of its own and records it with the Finalized event's block. A reorganisation then
    takes that block before the node's cursor read it: the node's next poll undoes the row and
    finalizes the claim itself (a row left `finalized` with no block would never be undone,
    and the claim would stay committed on chain, its fee never collected)."""
    protocol, w3 = registered, registered.w3
    request_id = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)
    assert [s.request_id for s in node.serve_pending()] == [request_id]
    protocol.advance(protocol.coordinator.parameter("challengeWindow") + 1)
    node.watch()
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    receipt = protocol.coordinator.finalize_send(request_id, protocol.consumer)
    node.finalize_due()
    with node.store.transaction() as conn:
        status, block = conn.execute(
            sa.select(st.requests.c.status, st.requests.c.status_block)
            .where(st.requests.c.request_id == request_id)).one()
    assert (status, block) == (RequestStatus.FINALIZED, receipt["blockNumber"])

    w3.provider.make_request("evm_revert", [fork])
    while w3.eth.block_number <= receipt["blockNumber"]:
        w3.provider.make_request("evm_mine", [])
    assert protocol.coordinator.get_request(request_id).status is Status.COMMITTED
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        node.watch()
    assert f"requests {request_id}: the blocks" in caplog.text, caplog.text
    with node.store.transaction() as conn:
        assert st.get_request(conn, request_id).status is RequestStatus.COMMITTED
    node.finalize_due()
    assert protocol.coordinator.get_request(request_id).status is Status.FINALIZED
    with node.store.transaction() as conn:
        assert st.get_request(conn, request_id).status is RequestStatus.FINALIZED
    node.store.dispose()


def test_issue20_point1_a_commit_dropped_with_its_request_is_kept_for_later(
        registered, sqlite_url, model, caplog):
    """A reorganisation takes the request's post and the node's commit with it: waiting for
    the commit reports it dropped, and the chain has no such request to ask about. The node
    logs it, keeps the answer to commit (the request may come back) and goes on: the serving
    pass raises nothing."""
    protocol, w3 = registered, registered.w3
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    request_id = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)

    def wait_after_a_reorganisation(tx_hash, *args, **kwargs):
        w3.provider.make_request("evm_revert", [fork])
        raise TxDropped(f"transaction {tx_hash.hex()} was dropped by the node, not mined")

    node.sender.wait = wait_after_a_reorganisation
    with caplog.at_level(logging.WARNING, logger="optinfer.provider"):
        assert node.serve_pending() == []
    assert f"the chain has no request {request_id} now (RequestNotFound)" in caplog.text
    with node.store.transaction() as conn:
        row = st.get_request(conn, request_id)
    assert (row.status, row.output != []) == (RequestStatus.COMMITTING, True)
    node.store.dispose()


def test_issue20_point7_a_fresh_node_does_not_answer_history_again(registered, sqlite_url,
                                                                   model):
    """A node started on an empty database reads every past request. One another provider
    already answered is recorded as such from the chain, not generated again (it generated
    every past request first, then found each commit refused); the open one is served: the
    node's cursor follows the coordinator's outcomes, history included."""
    protocol = registered
    prompt = model.encode(PROMPT_TEXT)
    other = protocol.accounts[5]
    protocol.coordinator.register_provider_send(protocol.coordinator.parameter("minimumStake"),
                                                other)
    answered, open_ = (protocol.post(prompt, max_tokens=8) for _ in range(2))
    protocol.coordinator.commit_output_send(answered, model.generate(prompt, 8), other)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)
    generated = []
    real = node._generations
    node._generations = lambda jobs: (generated.extend(jobs), real(jobs))[1]
    assert [s.request_id for s in node.serve_pending()] == [open_]
    assert len(generated) == 1
    with node.store.transaction() as conn:
        row, claim = st.get_request(conn, answered), st.get_claim(conn, answered)
    # Recorded from the chain's OutputCommitted as the other provider's claim.
    assert (row.status, claim.provider) == (RequestStatus.COMMITTED, other.address)
    node.store.dispose()


def test_two_nodes_on_one_key_both_end_with_the_chain_s_account(registered, tmp_path, model):
    """Two provider nodes share a key (an operator's mistake, issue 20 point 4), each with its
    own database. One commits a request's answer; the other's commit is refused. Both
    databases follow the commit (the outcome events), record the claim as their key's, and
    the fee is finalized once. (The issue saw the loser's row stay `skipped`; this sequence,
    one node after the other, is a guard, not that race.)"""
    protocol = registered
    request_id = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    first = _in_process_node(protocol, f"sqlite:///{tmp_path / 'first.db'}", model, stake=None)
    second = _in_process_node(protocol, f"sqlite:///{tmp_path / 'second.db'}", model,
                              stake=None)
    assert [s.request_id for s in first.serve_pending()] == [request_id]
    assert second.serve_pending() == []  # refused: the request is no longer open
    protocol.advance(protocol.coordinator.parameter("challengeWindow") + 1)
    for node in (second, first):
        node.poll_once()
    assert protocol.coordinator.get_request(request_id).status is Status.FINALIZED
    for node in (first, second):
        with node.store.transaction() as conn:
            row, claim = st.get_request(conn, request_id), st.get_claim(conn, request_id)
        assert (row.status, claim.provider) == (RequestStatus.FINALIZED, node.address)
        node.store.dispose()


def test_issue20_point4_a_provider_stops_when_another_process_sends_from_its_key(
        registered, run_provider, sqlite_url, model):
    """Another process sends from the provider's key (a second node, a wallet): the node's
    next commit finds its nonce taken by a transaction it did not sign, and the node stops
    with one line saying so and exits 2 (an operator's mistake), its journal consistent (the
    answer kept in a `committing` row that a restart commits), instead of racing the other
    process for every nonce. Restarted alone, the node commits that answer."""
    protocol = registered
    node = run_provider(protocol, sqlite_url)
    node.wait_for(r"serving model")
    first = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    node.wait_for(rf"served request {first}:")

    # The other process: one transfer from the same key, taking the node's next nonce.
    TxSender(protocol.w3, protocol.provider).send({"to": protocol.consumer.address, "value": 1})
    second = protocol.post(model.encode(PROMPT_TEXT), max_tokens=8)
    assert node.wait_exit(timeout=60) == 2
    log = node.log()
    assert (f"error: another process is sending transactions from {protocol.provider.address}"
            in log), log
    assert "Run one node per key" in log and "Traceback" not in log
    assert protocol.coordinator.get_request(second).status is Status.OPEN
    with Store(sqlite_url).transaction() as conn:
        row = st.get_request(conn, second)
    assert row.status == RequestStatus.COMMITTING and row.output

    restarted = run_provider(protocol, sqlite_url)
    restarted.wait_for(rf"served request {second}:")
    assert protocol.coordinator.get_output(second) == list(row.output)
    assert restarted.stop() == 0
