"""The HTTP API against a real store (SQLite and Postgres) and a real anvil with the registry
and the coordinator deployed and tiny-r1 registered: every endpoint's answers and refusals.

Accounts: 1 is the provider, 3 the node's consumer account (the default on anvil), 5 another
consumer posting directly.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from optinfer.contracts.coordinator import Status, token_hash
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import TxSender
from optinfer.models.chat import CHAT_TEMPLATE_FILE
from optinfer.models.runtime import IntegerModel
from optinfer.prover.game import Phase, Role
from optinfer.services import consumer
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS
from optinfer.services.statuses import GameStatus
from optinfer.services.store import GameRecord, MoveRecord, create_game, record_move
from tests.chat_models import THINK, tiny_r1_with_chat_template

from .conftest import API_KEY, ETHER, TINY_R1, sync_store

MODEL = IntegerModel(TINY_R1)
MODEL_ID = "0x" + consumer.model_id(MODEL).hex()
PROMPT = "12+34="
PROMPT_TOKENS = MODEL.encode(PROMPT)
ANSWER = MODEL.generate(PROMPT_TOKENS, 64)


def error(response, status: int) -> str:
    """The JSON error body's detail, after checking the status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["detail"]


# ----------------------------------------------------------------------------- models


def test_models_lists_the_served_model_by_its_id(client):
    (summary,) = client.get("/v1/models").json()["models"]
    assert summary["id"] == MODEL_ID
    assert summary["max_context"] == MODEL.max_context
    assert summary["nodes"] == MODEL.manifest["nodes"]
    assert summary["config"]["vocab_size"] == MODEL.vocab_size
    assert set(summary["files"]) == {"model.onnx", "decode.onnx", "weights.bin",
                                     "tokenizer.json"}


def test_manifest_is_served_byte_for_byte(client):
    response = client.get(f"/v1/models/{MODEL_ID}")
    assert response.status_code == 200
    assert response.content == (TINY_R1 / "manifest.json").read_bytes()
    # Any case of the hex digits names the same model.
    assert client.get(f"/v1/models/{MODEL_ID.upper().replace('0X', '0x')}").status_code == 200


def test_manifest_of_an_unknown_or_malformed_id_is_refused(client):
    assert "does not serve" in error(client.get("/v1/models/0x" + "ab" * 32), 404)
    assert client.get("/v1/models/0x1234").status_code == 422
    assert client.get("/v1/models/" + "ab" * 32).status_code == 422


@pytest.mark.parametrize("name", ["model.onnx", "weights.bin", "tokenizer.json"])
def test_model_files_download(client, name):
    response = client.get(f"/v1/models/{MODEL_ID}/files/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == (TINY_R1 / name).read_bytes()


def test_only_files_the_manifest_lists_are_served(client):
    base = f"/v1/models/{MODEL_ID}/files"
    assert "no file 'calibration.txt'" in error(client.get(f"{base}/calibration.txt"), 404)
    # manifest.json has its own route; a path never reaches the file route.
    assert client.get(f"{base}/manifest.json").status_code == 404
    assert client.get(f"{base}/..%2F..%2Ftiny_r1.py").status_code == 404
    assert client.get(f"/v1/models/0x{'00' * 32}/files/weights.bin").status_code == 404


# --------------------------------------------------------------------------- requests


def post_directly(w3, coordinator, account, max_tokens=64, fee=ETHER // 100) -> int:
    """A consumer with its own wallet posts PROMPT; the request id."""
    posted = consumer.post_request(coordinator, TxSender(w3, account), MODEL, PROMPT_TOKENS,
                                   max_tokens=max_tokens, fee=fee)
    return posted.request_id


def serve(coordinator, provider, request_id: int) -> None:
    """The provider commits tiny-r1's answer (registering first if it has not)."""
    stake, _ = coordinator.provider_stake(provider.address)
    if stake == 0:
        coordinator.register_provider_send(2 * ETHER, provider)
    coordinator.commit_output_send(request_id, ANSWER, provider)


@pytest.fixture
def two_requests(chain, w3, coordinator, deployment, client):
    """Request 1 answered by the provider, request 2 open, both in the node's store."""
    first = post_directly(w3, coordinator, chain.accounts[5])
    second = post_directly(w3, coordinator, chain.accounts[5], max_tokens=8, fee=123)
    serve(coordinator, chain.accounts[1], first)
    sync_store(client.app.state.node.store, coordinator, deployment.block_number)
    return first, second


def test_request_by_id_with_its_claim(client, chain, two_requests):
    first, second = two_requests
    body = client.get(f"/v1/requests/{first}").json()
    assert body["request_id"] == first
    assert body["consumer"] == chain.accounts[5].address
    assert body["model_id"] == MODEL_ID
    assert body["prompt"] == PROMPT_TOKENS and body["prompt_text"] == "<bos>" + PROMPT
    assert body["fee"] == str(ETHER // 100)
    assert body["status"] == "committed"
    claim = body["claim"]
    assert claim["provider"] == chain.accounts[1].address
    assert claim["output"] == ANSWER
    assert claim["output_text"] == MODEL.decode_text(ANSWER)
    assert body["games"] == []
    open_request = client.get(f"/v1/requests/{second}").json()
    assert open_request["status"] == "open" and open_request["claim"] is None
    assert open_request["fee"] == "123" and open_request["max_tokens"] == 8


def test_requests_list_filters_and_pages(client, two_requests):
    first, second = two_requests
    assert [r["request_id"] for r in client.get("/v1/requests").json()["requests"]] == [
        first, second]
    committed = client.get("/v1/requests", params={"status": "committed"}).json()
    assert [r["request_id"] for r in committed["requests"]] == [first]
    assert client.get("/v1/requests", params={"status": "finalized"}).json() == {
        "requests": [], "next_after": None}
    unknown = client.get("/v1/requests", params={"status": "answered"})  # not a node status
    assert unknown.status_code == 422 and "'refunded'" in unknown.text
    page = client.get("/v1/requests", params={"limit": 1}).json()
    assert [r["request_id"] for r in page["requests"]] == [first]
    assert page["next_after"] == first
    rest = client.get("/v1/requests", params={"limit": 1, "after": page["next_after"]}).json()
    assert [r["request_id"] for r in rest["requests"]] == [second]


@pytest.mark.parametrize("query", [
    {"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"status": "Open!"}, {"after": -2},
    {"after": 2**63},
])
def test_requests_list_refuses_bad_parameters(client, query):
    assert client.get("/v1/requests", params=query).status_code == 422


@pytest.mark.parametrize("request_id, status", [
    ("99", 404), ("-1", 422), (str(2**63), 422), ("abc", 422)])
def test_unknown_or_malformed_request_id(client, request_id, status):
    response = client.get(f"/v1/requests/{request_id}")
    assert response.status_code == status
    assert "detail" in response.json()


# ------------------------------------------------------------------------------ games


def test_game_with_its_moves_as_each_role_plays_it(client, two_requests):
    first, _ = two_requests
    store = client.app.state.node.store
    with store.transaction() as conn:
        for role in (Role.PROVIDER, Role.CHALLENGER):
            create_game(conn, GameRecord(game_id=7, player=role, request_id=first,
                                         phase=Phase.BISECTION, k=None, rounds=2,
                                         status=GameStatus.OPEN, state={}))
        record_move(conn, MoveRecord(7, Role.PROVIDER, 0, Role.PROVIDER, "PostRoot",
                                     {"root": "0x" + "11" * 32}, "0x" + "aa" * 32, 40))
        record_move(conn, MoveRecord(7, Role.PROVIDER, 1, Role.PROVIDER, "PostMid",
                                     {"mid": 449, "root": "0x" + "22" * 32}))
        record_move(conn, MoveRecord(7, Role.CHALLENGER, 0, Role.PROVIDER, "PostRoot",
                                     {"root": "0x" + "11" * 32}, "0x" + "aa" * 32, 40))
    game = client.get("/v1/games/7").json()
    assert game["game_id"] == 7 and game["request_id"] == first
    roles = {view["role"]: view for view in game["roles"]}
    assert set(roles) == {"provider", "challenger"}
    provider = roles["provider"]
    assert (provider["phase"], provider["rounds"], provider["status"]) == ("bisection", 2, "open")
    assert [(m["seq"], m["kind"]) for m in provider["moves"]] == [(0, "PostRoot"),
                                                                    (1, "PostMid")]
    assert provider["moves"][0]["tx_hash"] == "0x" + "aa" * 32
    assert provider["moves"][1]["payload"] == {"mid": 449, "root": "0x" + "22" * 32}
    assert len(roles["challenger"]["moves"]) == 1
    assert client.get(f"/v1/requests/{first}").json()["games"] == [7]


@pytest.mark.parametrize("game_id, status", [("8", 404), ("-3", 422), (str(2**64), 422)])
def test_unknown_or_malformed_game_id(client, game_id, status):
    assert client.get(f"/v1/games/{game_id}").status_code == status


# ------------------------------------------------------------------ posting requests


def test_posting_needs_the_api_key(client):
    body = {"prompt": PROMPT, "max_tokens": 8}
    assert "missing X-API-Key" in error(client.post("/v1/requests", json=body), 401)
    wrong = client.post("/v1/requests", json=body, headers={"X-API-Key": API_KEY + "x"})
    assert error(wrong, 403) == "wrong X-API-Key"
    latin1 = client.post("/v1/requests", json=body,
                         headers={"X-API-Key": "\u00e9".encode("latin-1") * 20})
    assert error(latin1, 403) == "wrong X-API-Key"


def test_a_node_without_an_api_key_posts_nothing(make_client):
    client = make_client(api_key=None)
    response = client.post("/v1/requests", json={"prompt": PROMPT, "max_tokens": 8},
                           headers={"X-API-Key": API_KEY})
    assert "does not post requests" in error(response, 403)


def test_posted_request_is_on_chain(client, chain, coordinator):
    response = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                           json={"prompt": PROMPT, "max_tokens": 30, "fee": "777"})
    assert response.status_code == 201, response.text
    posted = response.json()
    assert posted["prompt"] == PROMPT_TOKENS
    assert posted["consumer"] == chain.accounts[3].address  # the consumer's dev account
    on_chain = coordinator.get_request(posted["request_id"])
    assert on_chain.status == Status.OPEN
    assert on_chain.consumer == chain.accounts[3].address
    assert on_chain.prompt_hash == token_hash(PROMPT_TOKENS)
    assert on_chain.model_id.hex() == MODEL_ID[2:]
    assert (on_chain.max_tokens, on_chain.fee) == (30, 777)
    assert on_chain.commit_deadline == posted["commit_deadline"]
    receipt = coordinator.w3.eth.get_transaction_receipt(posted["tx_hash"])
    assert receipt["blockNumber"] == posted["block_number"]
    # Token ids work too, and consecutive posts take consecutive nonces.
    again = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                        json={"prompt_tokens": [1, 6, 16], "max_tokens": 4})
    assert again.status_code == 201, again.text
    assert again.json()["request_id"] == posted["request_id"] + 1
    assert coordinator.get_request(again.json()["request_id"]).fee == consumer.DEFAULT_FEE


@pytest.mark.parametrize("body, status, detail", [
    ({"prompt": PROMPT, "prompt_tokens": [1], "max_tokens": 4}, 422, None),
    ({"max_tokens": 4}, 422, None),
    ({"prompt": PROMPT, "max_tokens": 0}, 422, None),
    ({"prompt": PROMPT, "max_tokens": 4, "fee": "-1"}, 422, None),
    ({"prompt": PROMPT, "max_tokens": 4, "fee": 5}, 422, None),
    ({"prompt": PROMPT, "max_tokens": 4, "fee": str(2**96)}, 400, "fee"),
    ({"prompt": PROMPT, "max_tokens": 200}, 400, "exceed the model's context"),
    ({"prompt": "hello", "max_tokens": 4}, 400, "cannot encode"),
    ({"prompt_tokens": [1, 99], "max_tokens": 4}, 400, "outside the vocabulary"),
    ({"prompt_tokens": [], "max_tokens": 4}, 422, None),
    ({"prompt": PROMPT, "max_tokens": 4, "commit_seconds": 59}, 422, None),
    ({"prompt": PROMPT, "max_tokens": 4, "promt": "typo"}, 422, None),
    # tiny-r1 has no chat template
    ({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}, 400,
     "has no chat template"),
])
def test_bad_requests_are_refused_before_any_gas_is_spent(client, coordinator, body, status,
                                                          detail):
    before = coordinator.parameter("requestCount")
    response = client.post("/v1/requests", json=body, headers={"X-API-Key": API_KEY})
    assert response.status_code == status, response.text
    if detail:
        assert detail in response.json()["detail"]
    assert coordinator.parameter("requestCount") == before


@pytest.fixture
def chat_client(make_client, chain, w3, deployment, tmp_path):
    """A node serving tiny-r1 with a chat template (tests/chat_models.py), registered."""
    model_dir = tiny_r1_with_chat_template(tmp_path / "tiny-r1-chat")
    registry = ModelRegistry(w3, deployment.address("ModelRegistry"))
    registry.register_send(ModelSpec.from_manifest(model_dir / "manifest.json"),
                           chain.accounts[0])
    return make_client(model_dir=model_dir)


def test_posted_messages_are_formatted_with_the_models_chat_template(chat_client, coordinator):
    messages = [{"role": "system", "content": "9"}, {"role": "user", "content": PROMPT}]
    response = chat_client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                                json={"messages": messages, "max_tokens": 30})
    assert response.status_code == 201, response.text
    posted = response.json()
    # BOS, the system message and a space, the question, <think>: the template's layout.
    expected = [1, 14, 17, *PROMPT_TOKENS[1:], THINK]
    assert posted["prompt"] == expected
    on_chain = coordinator.get_request(posted["request_id"])
    assert on_chain.prompt_hash == token_hash(expected)
    (model,) = chat_client.get("/v1/models").json()["models"]
    assert on_chain.model_id.hex() == model["id"][2:] != MODEL_ID[2:]
    # The template travels with the model: the manifest lists it, the node serves it.
    served = chat_client.get(f"/v1/models/{model['id']}/files/{CHAT_TEMPLATE_FILE}")
    assert served.status_code == 200
    assert json.loads(served.content)["special_tokens"]["bos_token"] == "<bos>"
    assert CHAT_TEMPLATE_FILE in model["files"]


@pytest.mark.parametrize("body, status, detail", [
    ({"messages": [], "max_tokens": 4}, 422, "at least 1 item"),
    ({"messages": [{"role": "robot", "content": PROMPT}], "max_tokens": 4}, 422,
     "'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}], "max_tokens": 4}, 422, "Field required"),
    ({"messages": [{"role": "user", "content": PROMPT}], "prompt": PROMPT, "max_tokens": 4},
     422, "Extra inputs are not permitted"),
    # the template's raise_exception, and a character the tokenizer lacks
    ({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "46"}],
      "max_tokens": 4}, 400, "refuses the conversation: tiny-r1 answers one question"),
    ({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}, 400,
     "cannot encode the conversation"),
])
def test_bad_messages_are_refused_before_any_gas_is_spent(chat_client, coordinator, body,
                                                          status, detail):
    before = coordinator.parameter("requestCount")
    response = chat_client.post("/v1/requests", json=body, headers={"X-API-Key": API_KEY})
    assert response.status_code == status, response.text
    assert detail in json.dumps(response.json()["detail"])
    assert coordinator.parameter("requestCount") == before


def test_a_fee_the_consumer_account_cannot_pay(client, w3, chain):
    balance = w3.eth.get_balance(chain.accounts[3].address)
    response = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                           json={"prompt": PROMPT, "max_tokens": 4, "fee": str(balance + 1)})
    assert f"holds {balance} wei: it cannot pay" in error(response, 400)
    # Its whole balance leaves nothing for gas: the chain refuses, the API does not crash.
    response = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                           json={"prompt": PROMPT, "max_tokens": 4, "fee": str(balance)})
    assert "refused the transaction" in error(response, 503)


def test_posting_without_a_deployment_is_503(make_client, tmp_path):
    client = make_client(deployments=tmp_path / "missing.json")
    response = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                           json={"prompt": PROMPT, "max_tokens": 4})
    assert "no deployments file" in error(response, 503)


# ------------------------------------------------------------------ health, metrics


def test_health_reports_database_and_rpc(client, make_client):
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["chain_id"] == 31337
    down = make_client(rpc_url="http://127.0.0.1:9")
    body = down.get("/healthz")
    assert body.status_code == 503
    assert body.json()["database"] == "ok"
    assert "Connection refused" in body.json()["rpc"]


def metric_samples(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def test_metrics_read_from_store_and_chain(client, chain, w3, two_requests):
    first, _ = two_requests
    with client.app.state.node.store.transaction() as conn:
        create_game(conn, GameRecord(3, Role.PROVIDER, first, Phase.RESOLVED, 5, 9, "won", {}))
        create_game(conn, GameRecord(4, Role.PROVIDER, first, Phase.DESCENT, 5, 3, "open", {}))
    samples = metric_samples(client)
    assert samples[("optinfer_requests", (("status", "committed"),))] == 1
    assert samples[("optinfer_requests", (("status", "open"),))] == 1
    assert samples[("optinfer_games", (("role", "provider"), ("status", "won")))] == 1
    assert samples[("optinfer_games", (("role", "provider"), ("status", "open")))] == 1
    assert samples[("optinfer_chain_up", ())] == 1
    assert samples[("optinfer_requests_served_total", ())] == 1
    assert samples[("optinfer_provider_stake_wei", (("kind", "total"),))] == 2 * ETHER
    assert samples[("optinfer_provider_stake_wei", (("kind", "locked"),))] == (
        DEMO_COORDINATOR_PARAMS.stake_per_claim)
    # One claim, observed once however often the node is scraped.
    request_block = w3.eth.get_block(client.get(f"/v1/requests/{first}").json()["block_number"])
    claim_block = w3.eth.get_block(
        client.get(f"/v1/requests/{first}").json()["claim"]["block_number"])
    latency = claim_block["timestamp"] - request_block["timestamp"]
    for _ in range(2):
        samples = metric_samples(client)
        assert samples[("optinfer_commit_latency_seconds_count", ())] == 1
        assert samples[("optinfer_commit_latency_seconds_sum", ())] == latency


def test_metrics_without_the_chain_still_report_the_store(make_client):
    samples = metric_samples(make_client(rpc_url="http://127.0.0.1:9"))
    assert samples[("optinfer_chain_up", ())] == 0
    assert ("optinfer_provider_stake_wei", (("kind", "total"),)) not in samples
    assert samples[("optinfer_commit_latency_seconds_count", ())] == 0


def test_metrics_of_a_node_without_a_provider_account(client, coordinator):
    """Off the development chain a node may have no provider key: no provider metrics."""
    from prometheus_client import generate_latest

    from optinfer.services.metrics import ChainView, NodeMetrics

    metrics = NodeMetrics(client.app.state.node.store,
                          lambda: ChainView(coordinator.w3, coordinator, None))
    metrics.refresh()
    text = generate_latest(metrics.registry).decode()
    assert "optinfer_chain_up 1.0" in text
    assert "optinfer_provider_stake_wei" not in text
    assert "optinfer_requests_served_total" not in text


def test_openapi_schema_is_served(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/models", "/v1/models/{model_id}", "/v1/models/{model_id}/files/{name}",
            "/v1/requests", "/v1/requests/{request_id}", "/v1/games/{game_id}", "/healthz",
            "/metrics"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert json.dumps(schema)  # plain JSON


# ------------------------------------------------------------------ hostile input (issue 20)


def _raw_post(client, body: bytes):
    return client.post("/v1/requests", content=body, headers={
        "X-API-Key": API_KEY, "Content-Type": "application/json"})


def test_issue20_point9_a_body_nested_100000_deep_is_refused_and_the_api_lives_on(client):
    """It segfaulted the process: a library the nodes import raises the recursion limit to
    100,000, and the JSON parser recursed until the C stack overflowed. Refused unparsed."""
    import sys

    deep = b'{"prompt_tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b', "max_tokens": 8}'
    assert "nests deeper than 16 levels" in error(_raw_post(client, deep), 422)
    assert sys.getrecursionlimit() == 1000  # put back by create_app
    big = b'{"prompt": "' + b"1" * (3 * 1024 * 1024) + b'", "max_tokens": 8}'
    assert "over 2097152 bytes" in error(_raw_post(client, big), 413)
    assert client.get("/v1/requests").status_code == 200  # still serving
    # Brackets inside strings are text, not nesting.
    quoted = ('{"prompt": "' + "[" * 50 + '", "max_tokens": 0}').encode()
    assert _raw_post(client, quoted).status_code == 422  # max_tokens, not the depth
    assert "nests" not in _raw_post(client, quoted).text


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "\\ud800 1+1=", "max_tokens": 8}', "prompt"),  # a lone surrogate
    (b'{"prompt": "1+1=", "max_tokens": 1e400}', "max_tokens"),  # infinite
    (b'{"prompt": "1+1=", "max_tokens": NaN}', "max_tokens"),
    (b'{"prompt_tokens": [1, true], "max_tokens": 8}', "prompt_tokens"),  # a bool for an int
    (b'{"prompt": "1+1=", "max_tokens": "5"}', "max_tokens"),  # a string for an int
    (b'{"prompt": "1+1=", "max_tokens": 5.0}', "max_tokens"),  # a float for an int
    (b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 8}', "content"),
])
def test_issue20_points10_11_bad_values_are_422_naming_the_field_never_500(client, body,
                                                                          field):
    """These were 500s (an infinite or NaN number or a lone surrogate echoed back, which JSON
    cannot carry) or were accepted and posted on chain (true as a token id, "5" or 5.0 as an
    integer)."""
    response = _raw_post(client, body)
    detail = error(response, 422)
    assert any(field in map(str, entry["loc"]) for entry in detail), detail
    assert all(set(entry) == {"loc", "msg", "type"} for entry in detail)


def test_issue20_point10_a_request_not_mined_in_time_is_503_with_retry_after(client, w3):
    """A chain that stops mining: the posted request's transaction is sent and never mined
    within the sender's receipt timeout (shortened here to a second). web3's TimeExhausted
    was a 500."""
    client.app.state.node.consumer_sender().receipt_timeout = 1.0
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        response = client.post("/v1/requests", json={"prompt": PROMPT, "max_tokens": 8},
                               headers={"X-API-Key": API_KEY})
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
        w3.provider.make_request("evm_mine", [])
    assert "not mined in time" in error(response, 503)
    assert response.headers["Retry-After"] == "5"


def test_issue20_point3_posting_after_the_chain_lost_blocks_recovers_without_a_hand(client, w3):
    """The chain loses the block of a posted request (a node restarted from an older state):
    the API's count of the consumer's nonces is ahead of the chain, and the next POST waited
    120 s behind the gap and answered 500 until someone intervened. Now the transaction
    stranded behind the gap is seen within seconds: 503 with Retry-After, the count taken
    from the chain again, and the retry is posted."""
    import time

    body, headers = {"prompt": PROMPT, "max_tokens": 8}, {"X-API-Key": API_KEY}
    fork = w3.provider.make_request("evm_snapshot", [])["result"]
    assert client.post("/v1/requests", json=body, headers=headers).status_code == 201
    w3.provider.make_request("evm_revert", [fork])
    started = time.monotonic()
    stranded = client.post("/v1/requests", json=body, headers=headers)
    assert "nonce gap" in error(stranded, 503)
    assert stranded.headers["Retry-After"] == "5"
    assert time.monotonic() - started < 15
    again = client.post("/v1/requests", json=body, headers=headers)
    assert again.status_code == 201, again.text
    # The stranded one was cancelled: the gap filled, it did not land as a second request.
    w3.provider.make_request("evm_mine", [])
    coordinator = client.app.state.node.chain().coordinator
    assert coordinator.parameter("requestCount") == again.json()["request_id"] == 1
    assert client.post("/v1/requests", json=body, headers=headers).status_code == 201
