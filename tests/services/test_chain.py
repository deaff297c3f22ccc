"""The chain client on a real anvil: events delivered exactly once across restarts and
crashes with confirmations, nonces and gas of the transaction sender (``contracts/sender.py``,
which the bindings' sends go through too), and retries against nodes that refuse, drop or
never answer."""

from __future__ import annotations

import json
import math
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from eth_utils import event_abi_to_log_topic
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound

from optinfer.contracts.bindings import ContractRevert, padded_gas
from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec
from optinfer.contracts.sender import GAS_MARGIN, TxDropped, TxFailed, TxSender, sign_dynamic_fee
from optinfer.errors import UserError
from optinfer.services import store as st
from optinfer.services.chain import RetryPolicy, RpcUnavailable, connect
from optinfer.services.events import EventCursor, EventDecoder, logs_since, request_record
from optinfer.services.store import Store
from tests.services.conftest import tiny_r1_spec
from tests.services.rpc_proxy import RpcProxy

FEE = 10**16


def mine(w3: Web3, blocks: int) -> None:
    w3.provider.make_request("anvil_mine", [hex(blocks)])


def post_requests(w3: Web3, coordinator: InferenceCoordinator, consumer, count: int) -> list[int]:
    """`count` requests, one block each; their ids."""
    ids = []
    for index in range(count):
        spec = RequestSpec(model_id=tiny_r1_spec().model_id, prompt=[1, 6, 7 + index],
                           max_tokens=8, commit_deadline=w3.eth.get_block("latest")["timestamp"]
                           + 3600)
        receipt = coordinator.post_request_send(spec, FEE, consumer)
        ids.append(coordinator.events(receipt, "RequestPosted")[0]["requestId"])
    return ids


class Recorder:
    """A handler that stores each request and remembers what it was handed."""

    def __init__(self, fail_on: int | None = None):
        self.delivered: list[int] = []
        self.fail_on = fail_on

    def __call__(self, conn, event) -> None:
        assert event.name == "RequestPosted"
        record = request_record(event)
        if record.request_id == self.fail_on:
            raise RuntimeError("handler crashed")
        st.upsert_request(conn, record)
        self.delivered.append(record.request_id)


def cursor_on(w3, store, deployment, **kwargs) -> EventCursor:
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    return EventCursor(w3, store, "coordinator", [coordinator.contract],
                       events=["RequestPosted"], start_block=deployment.block_number, **kwargs)


def stored_ids(store: Store) -> list[int]:
    with store.transaction() as conn:
        return sorted(r.request_id for r in st.requests_with_status(conn, "open", limit=1000))


# ------------------------------------------------------------------------------- events


def test_events_exactly_once_with_confirmations_across_a_restart(chain, w3, deployment,
                                                                 database_url):
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    consumer = chain.accounts[2]
    first_batch = post_requests(w3, coordinator, consumer, 3)

    store = Store(database_url)
    store.migrate()
    recorder = Recorder()
    cursor = cursor_on(w3, store, deployment, confirmations=2)
    # The last two requests are not yet 2 blocks deep.
    assert cursor.poll(recorder) == 1
    assert recorder.delivered == first_batch[:1]
    mine(w3, 2)
    assert cursor.poll(recorder) == 2
    assert cursor.poll(recorder) == 0
    second_batch = post_requests(w3, coordinator, consumer, 2)
    mine(w3, 1)  # the first of the new requests is confirmed, the second is not
    assert cursor.poll(recorder) == 1
    store.dispose()

    # A restart: a new store object and a new cursor on the same database.
    restarted_store = Store(database_url)
    restarted = cursor_on(w3, restarted_store, deployment, confirmations=2)
    mine(w3, 5)
    assert restarted.poll(recorder) == 1
    assert recorder.delivered == first_batch + second_batch
    assert stored_ids(restarted_store) == sorted(first_batch + second_batch)
    with restarted_store.transaction() as conn:
        assert st.get_cursor(conn, "coordinator") == w3.eth.block_number - 2
    restarted_store.dispose()


def test_a_crashing_handler_commits_nothing_and_its_range_is_delivered_again(
        chain, w3, deployment, store):
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    ids = post_requests(w3, coordinator, chain.accounts[2], 3)
    cursor = cursor_on(w3, store, deployment, max_block_range=1000)
    crashing = Recorder(fail_on=ids[1])
    with pytest.raises(RuntimeError, match="handler crashed"):
        cursor.poll(crashing)
    # ids[0] was handled inside the rolled-back transaction: not stored, cursor unmoved.
    assert stored_ids(store) == []
    with store.transaction() as conn:
        assert st.get_cursor(conn, "coordinator") == deployment.block_number - 1
    healthy = Recorder()
    assert cursor.poll(healthy) == 3
    assert healthy.delivered == ids
    assert stored_ids(store) == sorted(ids)


def test_small_block_ranges_skip_nothing(chain, w3, deployment, store):
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    mine(w3, 3)
    ids = post_requests(w3, coordinator, chain.accounts[2], 4)
    mine(w3, 2)
    recorder = Recorder()
    assert cursor_on(w3, store, deployment, max_block_range=2).poll(recorder) == 4
    assert recorder.delivered == ids


def test_a_reorganised_chain_sends_the_cursor_back_to_its_newest_canonical_checkpoint(
        chain, w3, deployment, database_url):
    """Blocks the cursor read leave the chain and others take their place: the next poll goes
    back to the newest checkpoint still canonical, hands the rewind to `on_rewind` and reads
    the replacing blocks; the requests they hold replace the lost ones under the same ids."""
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    consumer = chain.accounts[2]
    store = Store(database_url)
    store.migrate()
    recorder, rewinds = Recorder(), []
    cursor = cursor_on(w3, store, deployment,
                       on_rewind=lambda conn, block: rewinds.append(block))
    kept = post_requests(w3, coordinator, consumer, 1)
    assert cursor.poll(recorder) == 1
    fork_block = w3.eth.block_number
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    lost = post_requests(w3, coordinator, consumer, 2)
    assert cursor.poll(recorder) == 2
    with store.transaction() as conn:
        lost_tx = st.get_request(conn, lost[0]).tx_hash

    w3.provider.make_request("evm_revert", [fork])
    replacing = post_requests(w3, coordinator, chain.accounts[3], 3)  # another consumer
    assert replacing[:2] == lost  # the same ids, other requests
    assert cursor.poll(recorder) == 3
    assert rewinds == [fork_block]
    assert recorder.delivered == kept + lost + replacing
    with store.transaction() as conn:
        first = st.get_request(conn, lost[0])
        assert (first.tx_hash != lost_tx, first.consumer) == (True, chain.accounts[3].address)
        assert first.block_hash == "0x" + bytes(w3.eth.get_block(first.block_number)["hash"]).hex()
        assert st.checkpoints(conn, "coordinator")[0] == (
            w3.eth.block_number, "0x" + bytes(w3.eth.get_block("latest")["hash"]).hex())
    assert cursor.poll(recorder) == 0 and rewinds == [fork_block]  # nothing lost since
    store.dispose()


def cursor_at_a_fork(chain, w3, deployment, database_url) -> tuple:
    """(coordinator, store, cursor, recorder, rewinds, kept, fork block, fork): a cursor that
    has read one posted request (`kept`), and a snapshot of the chain there to revert to."""
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    store = Store(database_url)
    store.migrate()
    recorder, rewinds = Recorder(), []
    cursor = cursor_on(w3, store, deployment,
                       on_rewind=lambda conn, block: rewinds.append(block))
    kept = post_requests(w3, coordinator, chain.accounts[2], 1)
    assert cursor.poll(recorder) == 1
    fork_block = w3.eth.block_number
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    return coordinator, store, cursor, recorder, rewinds, kept, fork_block, fork


def test_a_chain_that_gets_shorter_between_the_cursors_reads_ends_the_poll_quietly(
        chain, w3, deployment, database_url):
    """The chain shrinks after the cursor read its range's last hash and before it asks for
    the range's logs (a reorganisation under way): the node refuses the range; the poll stops
    there without raising, and the next one goes back and reads what replaced it."""
    coordinator, store, cursor, recorder, rewinds, kept, fork_block, fork = cursor_at_a_fork(
        chain, w3, deployment, database_url)
    post_requests(w3, coordinator, chain.accounts[2], 2)
    fetch = cursor.fetch

    def fetch_after_the_chain_shrank(first, last):
        w3.provider.make_request("evm_revert", [fork])
        return fetch(first, last)

    cursor.fetch = fetch_after_the_chain_shrank
    assert w3.eth.block_number > fork_block
    assert cursor.poll(recorder) == 0
    cursor.fetch = fetch
    with store.transaction() as conn:
        assert st.get_cursor(conn, "coordinator") == fork_block
    replacing = post_requests(w3, coordinator, chain.accounts[3], 1)
    assert cursor.poll(recorder) == 1
    assert recorder.delivered == kept + replacing and rewinds == []
    store.dispose()


def test_a_reorganisation_between_the_cursors_check_and_its_read_is_still_followed(
        chain, w3, deployment, database_url):
    """The chain reorganises after a poll checked its newest checkpoint and before it read
    the next range: that range, read whole from the new chain, must not hide the loss of the
    blocks read before it. The poll goes back to the fork and reads what replaced them."""
    coordinator, store, cursor, recorder, rewinds, kept, fork_block, fork = cursor_at_a_fork(
        chain, w3, deployment, database_url)
    lost = post_requests(w3, coordinator, chain.accounts[2], 2)
    assert cursor.poll(recorder) == 2
    lost_height = w3.eth.block_number
    safe_head = cursor.safe_head
    replacing: list[int] = []

    def safe_head_after_a_reorganisation() -> int:
        w3.provider.make_request("evm_revert", [fork])
        replacing.extend(post_requests(w3, coordinator, chain.accounts[3], 3))
        return safe_head()

    cursor.safe_head = safe_head_after_a_reorganisation
    assert cursor.poll(recorder) == 3
    assert w3.eth.block_number > lost_height and replacing[:2] == lost
    assert rewinds == [fork_block]
    assert recorder.delivered == kept + lost + replacing
    store.dispose()


def test_logs_since_a_block_the_chain_no_longer_has_are_none(chain, w3, deployment):
    """A node reads logs from a block it recorded (a claim's, say) after a reorganisation
    made the chain shorter than that: none, where the node refuses the range."""
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    ids = post_requests(w3, coordinator, chain.accounts[2], 2)
    posted = coordinator.contract.events.RequestPosted
    assert [e["args"]["requestId"] for e in logs_since(w3, posted, deployment.block_number)
            ] == ids
    assert [e["args"]["requestId"] for e in logs_since(w3, posted, deployment.block_number,
                                                       requestId=ids[1])] == ids[1:]
    assert logs_since(w3, posted, w3.eth.block_number + 3) == []


def test_the_cursor_s_decoder_gives_what_web3_s_process_log_gives(chain, w3, deployment):
    """`EventDecoder` (eth_abi directly, for speed) against web3's own decoding, on every
    log the coordinator emitted: posts (indexed uint, address and bytes32; a uint32 array,
    addresses, ints in the data) and a provider's registration."""
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    post_requests(w3, coordinator, chain.accounts[2], 2)
    coordinator.register_provider_send(coordinator.parameter("minimumStake"), chain.accounts[5])
    by_topic = {bytes(event_abi_to_log_topic(entry)): entry for entry in coordinator.contract.abi
                if entry["type"] == "event"}
    logs = w3.eth.get_logs({"fromBlock": deployment.block_number, "toBlock": "latest",
                            "address": coordinator.address})
    names = set()
    for log in logs:
        abi = by_topic[bytes(log["topics"][0])]
        expected = dict(getattr(coordinator.contract.events, abi["name"])().process_log(log)[
            "args"])
        decoded = EventDecoder(abi).args(log)
        assert decoded == expected and list(decoded) == list(expected), abi["name"]
        assert [type(v) for v in decoded.values()] == [type(v) for v in expected.values()]
        names.add(abi["name"])
    assert {"RequestPosted", "ProviderRegistered"} <= names


def test_two_cursors_on_one_database_share_the_work(chain, w3, deployment, database_url):
    """Two processes polling the same cursor (two engines): each event is handled once."""
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    ids = post_requests(w3, coordinator, chain.accounts[2], 6)
    stores = [Store(database_url) for _ in range(2)]
    stores[0].migrate()
    recorder = Recorder()
    lock = threading.Lock()

    def handle(conn, event):
        with lock:
            recorder(conn, event)

    threads = [threading.Thread(target=cursor_on(w3, s, deployment, max_block_range=1).poll,
                                args=(handle,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(recorder.delivered) == sorted(ids)
    assert stored_ids(stores[0]) == sorted(ids)
    for s in stores:
        s.dispose()


# ------------------------------------------------------------------------- transactions


def test_two_quick_transactions_get_consecutive_nonces_and_padded_gas(chain, w3):
    sender = TxSender(w3, chain.accounts[3])
    start = w3.eth.get_transaction_count(sender.address)
    to = chain.accounts[4].address
    hashes = [sender.submit({"to": to, "value": 1}), sender.submit({"to": to, "value": 2})]
    receipts = [sender.wait(h) for h in hashes]
    assert [w3.eth.get_transaction(h)["nonce"] for h in hashes] == [start, start + 1]
    assert all(r["status"] == 1 for r in receipts)
    assert w3.eth.get_transaction(hashes[0])["gas"] == 25_200  # 21000 * 1.2
    assert sender.next_nonce == start + 2


@pytest.mark.parametrize("tx", [
    {"to": "0x" + "22" * 20, "value": 0, "data": b"", "gas": 21_000, "nonce": 0},
    {"to": "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB", "value": 10**18 + 1,
     "data": bytes(range(256)) * 3, "gas": 8_000_000, "nonce": 2**40},
    {"value": 0, "data": "0x6001600055", "gas": 100_000, "nonce": 7},  # a deployment
])
def test_dynamic_fee_signing_makes_the_bytes_eth_account_makes(tx):
    from eth_account import Account
    from eth_keys.datatypes import PrivateKey

    account = Account.from_key("0x" + "4c" * 32)
    tx = {**tx, "chainId": 31337, "maxFeePerGas": 3 * 10**9, "maxPriorityFeePerGas": 0}
    reference = account.sign_transaction(tx)
    raw, tx_hash = sign_dynamic_fee(PrivateKey(bytes(account.key)), tx)
    assert raw == bytes(reference.raw_transaction)
    assert tx_hash == bytes(reference.hash)
    assert Account.recover_transaction(raw) == account.address


def test_transactions_the_node_drops_are_reported_and_their_nonces_used_again(chain, w3):
    """Two transfers wait in the pool when the node drops them (as a restarted node would):
    the wait reports the drop instead of polling until its timeout, the sender takes its
    nonce from the chain again, and the next transfer gets the first dropped one's nonce."""
    # Without the drop check, each wait would end in TimeExhausted after 120 s instead.
    sender = TxSender(w3, chain.accounts[3], receipt_timeout=120, receipt_poll=0.01)
    to = chain.accounts[4].address
    start = w3.eth.get_transaction_count(sender.address)
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        dropped = [sender.submit({"to": to, "value": 1}), sender.submit({"to": to, "value": 2})]
        assert sender.next_nonce == start + 2
        w3.provider.make_request("anvil_dropAllTransactions", [])
        for tx_hash in dropped:
            with pytest.raises(TxDropped, match="dropped by the node"):
                sender.wait(tx_hash)
        assert sender.next_nonce == start
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    receipt = sender.send({"to": to, "value": 3})
    assert w3.eth.get_transaction(receipt["transactionHash"])["nonce"] == start


def test_issue20_point2_a_transaction_stranded_behind_a_nonce_gap_is_reported_and_resent(
        chain, w3):
    """A reorganisation takes a mined transfer of the key's: the sender's count is ahead of
    the chain, and its next transaction waits behind the gap. The wait reports it within a
    few polls (not after the receipt timeout), the nonce is taken from the chain again, and
    the transfer sent again is mined."""
    sender = TxSender(w3, chain.accounts[6], receipt_timeout=120, receipt_poll=0.01)
    to = chain.accounts[4].address
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    start = w3.eth.get_transaction_count(sender.address)
    sender.send({"to": to, "value": 1})
    w3.provider.make_request("evm_revert", [fork])
    stranded = sender.submit({"to": to, "value": 2})
    assert sender.next_nonce == start + 2
    began = time.monotonic()
    with pytest.raises(TxDropped, match=f"waits behind a nonce gap \\(nonce {start + 1};"):
        sender.wait(stranded)
    assert time.monotonic() - began < 10
    assert sender.next_nonce == start
    receipt = sender.send({"to": to, "value": 2})
    assert w3.eth.get_transaction(receipt["transactionHash"])["nonce"] == start
    # The stranded transfer was replaced by a no-op at its nonce: with the gap filled, the
    # no-op is mined there, and the transfer the caller was told had failed never lands.
    w3.provider.make_request("evm_mine", [])
    with pytest.raises(TransactionNotFound):
        w3.eth.get_transaction(stranded)
    assert w3.eth.get_transaction_count(sender.address) == start + 2
    assert sender.send({"to": to, "value": 3})["status"] == 1  # the count catches up


def test_stale_nonce_is_resynchronised_from_the_chain(chain, w3):
    account = chain.accounts[3]
    sender = TxSender(w3, account)
    sender.send({"to": chain.accounts[4].address, "value": 1})
    # Another sender of the same key sends behind its back: its local count is now stale.
    TxSender(w3, account).send({"to": chain.accounts[4].address, "value": 1})
    stale = sender.next_nonce
    receipt = sender.send({"to": chain.accounts[4].address, "value": 3})
    assert receipt["status"] == 1
    assert w3.eth.get_transaction(receipt["transactionHash"])["nonce"] == stale + 1
    assert sender.next_nonce == w3.eth.get_transaction_count(account.address)


def test_a_revert_is_decoded_and_sends_nothing(chain, w3, deployment):
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    sender = TxSender(w3, chain.accounts[1])
    before = w3.eth.get_transaction_count(sender.address)
    with pytest.raises(ContractRevert) as raised:
        sender.send(coordinator.commit_output_tx(999, [1, 2]), coordinator.artifact)
    assert raised.value.name is not None  # a named custom error of the coordinator
    assert w3.eth.get_transaction_count(sender.address) == before


def test_a_bindings_send_goes_through_the_one_sender(chain, w3, deployment, monkeypatch):
    """A binding builds the transaction (its calldata, encoded by eth_abi alone, is web3's
    encoding of the same call) and its `<write>_send` hands it to TxSender: the gas limit is
    the one rule on the node's estimate, and a transaction mined but failed raises TxFailed."""
    coordinator = InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))
    web3_encoding = coordinator.contract.encode_abi  # web3's, with its argument checks
    assert coordinator.tx("finalize", 7) == {
        "to": coordinator.address, "value": 0,
        "data": bytes(HexBytes(web3_encoding("finalize", [7])))}
    consumer = chain.accounts[2]
    spec = RequestSpec(model_id=tiny_r1_spec().model_id, prompt=[1, 6, 7], max_tokens=8,
                       commit_deadline=w3.eth.get_block("latest")["timestamp"] + 3600)
    tx = coordinator.post_request_tx(spec, FEE)
    assert tx == {"to": coordinator.address, "value": FEE,
                  "data": bytes(HexBytes(web3_encoding("postRequest", spec.as_args())))}
    sent = []
    real_send = TxSender.send
    monkeypatch.setattr(TxSender, "send", lambda self, tx, artifact=None: sent.append(
        (self.address, tx, artifact)) or real_send(self, tx, artifact))
    estimate = w3.eth.estimate_gas({**tx, "from": consumer.address})
    receipt = coordinator.post_request_send(spec, FEE, consumer)
    assert sent == [(consumer.address, tx, coordinator.artifact)]
    mined = w3.eth.get_transaction(receipt["transactionHash"])
    assert mined["gas"] == padded_gas(estimate, math.ceil(estimate * GAS_MARGIN))
    assert (mined["to"], mined["value"], bytes(mined["input"])) == (tx["to"], FEE, tx["data"])
    # An estimate too low for the call: the transaction is mined, runs out of gas and fails.
    monkeypatch.setattr(TxSender, "_estimate", lambda self, tx, artifact: 21_100)
    with pytest.raises(TxFailed, match="failed in block"):
        coordinator.withdraw_send(consumer)


def test_lost_answer_to_a_send_does_not_send_twice(chain, w3):
    """The node gets the transaction but its answer is lost; the retried send finds the
    transaction already there and the sender counts it once. (`w3` only for its snapshot.)"""
    with RpcProxy(chain.url) as proxy:
        w3 = connect(proxy.url, RetryPolicy(attempts=3, initial_delay=0.01))
        sender = TxSender(w3, chain.accounts[5])
        start = w3.eth.get_transaction_count(sender.address)
        proxy.fail("eth_sendRawTransaction", "lose")
        receipt = sender.send({"to": chain.accounts[6].address, "value": 7})
        assert receipt["status"] == 1
        assert proxy.forwarded["eth_sendRawTransaction"] == 2  # the original and the retry
        assert w3.eth.get_transaction_count(sender.address) == start + 1
        assert sender.next_nonce == start + 1


# ----------------------------------------------------------------------------- retries


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_refused_connection_fails_after_the_configured_attempts():
    url = f"http://127.0.0.1:{free_port()}"
    w3 = connect(url, RetryPolicy(attempts=3, initial_delay=0.01), timeout=1)
    started = time.monotonic()
    with pytest.raises(RpcUnavailable) as raised:
        w3.eth.block_number  # noqa: B018 (the property does the request)
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "eth_blockNumber" in message and url in message
    assert "after 3 attempt(s)" in message and "Connection refused" in message


def test_node_that_never_answers_times_out_and_fails():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        w3 = connect(url, RetryPolicy(attempts=2, initial_delay=0.01), timeout=0.3)
        with pytest.raises(RpcUnavailable, match=r"after 2 attempt\(s\).*Timeout"):
            w3.eth.chain_id  # noqa: B018


def test_dropped_connections_are_retried_until_the_node_answers(chain):
    with RpcProxy(chain.url) as proxy:
        proxy.fail("eth_chainId", "refuse", times=2)
        w3 = connect(proxy.url, RetryPolicy(attempts=3, initial_delay=0.01))
        assert w3.eth.chain_id == chain.chain_id
        assert proxy.seen["eth_chainId"] == 3
        proxy.fail("eth_chainId", "refuse", times=3)
        with pytest.raises(RpcUnavailable):
            w3.eth.chain_id  # noqa: B018


def test_throttled_and_busy_answers_are_retried(chain):
    """HTTP 429 and 503 (a hosted endpoint under load) are retried like a dropped connection,
    and never reach the node twice."""
    with RpcProxy(chain.url) as proxy:
        proxy.fail("eth_chainId", "throttle")
        proxy.fail("eth_chainId", "busy")
        w3 = connect(proxy.url, RetryPolicy(attempts=3, initial_delay=0.01))
        assert w3.eth.chain_id == chain.chain_id
        assert (proxy.seen["eth_chainId"], proxy.forwarded["eth_chainId"]) == (3, 1)


class _ClosingNode(BaseHTTPRequestHandler):
    """Answers eth_blockNumber over HTTP/1.1, then closes the connection without a
    ``Connection: close`` header (as a node does when its keep-alive timeout fires); records the
    connections and the Authorization headers it saw."""

    protocol_version = "HTTP/1.1"
    seen: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"],
                           "result": hex(len(type(self).seen))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_a_kept_alive_connection_the_node_closed_is_opened_again_without_a_retry():
    _ClosingNode.seen = []
    with ThreadingHTTPServer(("127.0.0.1", 0), _ClosingNode) as node:
        threading.Thread(target=node.serve_forever, daemon=True).start()
        url = f"http://user:pa%20ss@127.0.0.1:{node.server_address[1]}/rpc"
        w3 = connect(url, RetryPolicy(attempts=1))  # a failed request would not be retried
        try:
            numbers = []
            for _ in range(3):
                numbers.append(w3.eth.block_number)
                time.sleep(0.05)  # idle: the node's close reaches this side
        finally:
            node.shutdown()
    assert numbers == [1, 2, 3]
    assert _ClosingNode.seen == ["Basic dXNlcjpwYSBzcw=="] * 3  # user:pa ss


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the refused TLS handshake below is the point, not a server fault


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_an_https_node_is_reached_when_its_certificate_is_trusted_and_refused_at_once_if_not(
        tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    _ClosingNode.seen = []
    with _QuietServer(("127.0.0.1", 0), _ClosingNode) as node:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        node.socket = tls.wrap_socket(node.socket, server_side=True)
        threading.Thread(target=node.serve_forever, daemon=True).start()
        url = f"https://127.0.0.1:{node.server_address[1]}/rpc"
        try:
            # A certificate nobody vouches for is not a transient fault: no retry.
            untrusted = connect(url, RetryPolicy(attempts=3, initial_delay=0.01))
            with pytest.raises(RpcUnavailable, match=r"TLS failed \(CERTIFICATE_VERIFY_FAILED"
                                                     r"\); its certificate is not trusted"):
                untrusted.eth.block_number  # noqa: B018
            assert _ClosingNode.seen == []
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as an operator trusts a CA
            assert connect(url, RetryPolicy(attempts=1)).eth.block_number == 1
        finally:
            node.shutdown()


def test_a_url_that_is_not_http_is_refused_with_its_name():
    with pytest.raises(UserError, match="'ws://127.0.0.1:8545' is not an http"):
        connect("ws://127.0.0.1:8545")


def test_retry_delays_double_up_to_the_cap():
    policy = RetryPolicy(attempts=6, initial_delay=0.5, max_delay=3)
    assert list(policy.delays()) == [0.5, 1.0, 2.0, 3, 3]


def test_the_rpc_benchmark_measures_both_clients_on_every_method():
    """`optinfer bench rpc`'s machinery on a few calls (no timing asserted): every method is
    measured for both clients and the ratio is theirs."""
    from optinfer.services.rpc_bench import METHODS, bench_rpc

    report = bench_rpc(calls=5, rounds=1)
    assert set(report["methods"]) == {method for method, _ in METHODS}
    for row in report["methods"].values():
        for client in ("optinfer", "web3"):
            assert row[f"{client}_wall_ms"] > 0 and row[f"{client}_cpu_ms"] >= 0
        if row["optinfer_cpu_ms"]:
            assert row["web3_over_optinfer_cpu"] == row["web3_cpu_ms"] / row["optinfer_cpu_ms"]
