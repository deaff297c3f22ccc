"""The API over the database the real provider node fills: a request posted through the API is
served by the node (in-process, one step at a time), and the API shows it committed with its
answer, counts it in the metrics, and shows it finalized once the node finalizes it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.models.runtime import IntegerModel
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS, deploy_all
from optinfer.services.provider import ProviderNode

from .conftest import API_KEY, TINY_R1, tiny_r1_spec

MODEL = IntegerModel(TINY_R1)


@pytest.fixture
def protocol(chain, w3, tmp_path: Path):
    """Every contract deployed (the node needs the dispute game), tiny-r1 registered."""
    deployed = deploy_all(w3, chain.accounts[0])
    ModelRegistry(w3, deployed.address("ModelRegistry")).register_send(tiny_r1_spec(),
                                                                      chain.accounts[0])
    path = tmp_path / "full-deployments.json"
    deployed.write(path)
    return deployed, path


def samples(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def test_a_request_posted_through_the_api_is_served_and_shown(make_client, protocol, chain,
                                                             w3, database_url):
    deployed, path = protocol
    client = make_client(deployments=path)
    node = ProviderNode(w3=w3, store=client.app.state.node.store, deployments=deployed,
                        model=MODEL, account=chain.accounts[1], poll_interval=0.1)
    node.ensure_provider_registered(None)

    posted = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                         json={"prompt": "12+34=", "max_tokens": 40})
    assert posted.status_code == 201, posted.text
    request_id = posted.json()["request_id"]

    (served,) = node.poll_once()
    assert served.request_id == request_id
    shown = client.get(f"/v1/requests/{request_id}").json()
    assert shown["status"] == "committed"
    assert shown["consumer"] == chain.accounts[3].address
    assert shown["claim"]["provider"] == chain.accounts[1].address
    assert shown["claim"]["output"] == MODEL.generate(shown["prompt"], 40)
    assert shown["claim"]["output_text"] == "<think>2+4+0=06 1+3+0=04</think>46"
    metrics = samples(client)
    assert metrics["optinfer_requests_served_total"] == 1
    assert metrics["optinfer_commit_latency_seconds_count"] == 1

    w3.provider.make_request("evm_increaseTime", [DEMO_COORDINATOR_PARAMS.challenge_window + 1])
    w3.provider.make_request("evm_mine", [])
    time.sleep(0.2)  # the node asks the chain's time at most once per poll interval
    node.poll_once()
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "finalized"
    assert client.get("/v1/requests", params={"status": "finalized"}).json()["requests"][0][
        "request_id"] == request_id


def test_a_sampled_request_posted_through_the_api_is_drawn_by_the_chain_s_seed(
        make_client, protocol, chain, w3):
    """Issue 22 through the API: `temperature`, `top_p` and the consumer's `seed` are posted;
    the response and the request view show the draw the chain fixed (its seed derived from the
    consumer's and the request id); the provider node answers with exactly that draw."""
    from optinfer.contracts.coordinator import draw_seed
    from optinfer.models.sampling import Sampling
    from optinfer.models.tiny_r1 import SAMPLING_DIR

    deployed, path = protocol
    sampler = IntegerModel(SAMPLING_DIR)
    ModelRegistry(w3, deployed.address("ModelRegistry")).register_send(
        ModelSpec.from_manifest(SAMPLING_DIR / "manifest.json"), chain.accounts[0])
    client = make_client(deployments=path, model_dir=SAMPLING_DIR)
    node = ProviderNode(w3=w3, store=client.app.state.node.store, deployments=deployed,
                        model=sampler, account=chain.accounts[1], poll_interval=0.1)
    node.ensure_provider_registered(None)

    # A consumer seed whose draw answers otherwise than greedy decoding (tiny-r1 is nearly
    # one-hot: at T 2 about one seed in three), so that only the drawn answer passes.
    prompt, greedy = sampler.encode("12+34="), sampler.generate(sampler.encode("12+34="), 40)

    def drawn(consumer_seed: int) -> tuple[int, list[int]]:
        seed = draw_seed(w3.eth.chain_id, deployed.address("InferenceCoordinator"), 1,
                         chain.accounts[3].address, consumer_seed)
        return seed, sampler.generate(prompt, 40, draw=Sampling(2000, 1000, seed))

    consumer_seed = next(s for s in range(64) if drawn(s)[1] != greedy)
    seed, answer = drawn(consumer_seed)
    posted = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                         json={"prompt": "12+34=", "max_tokens": 40, "temperature": 2,
                               "top_p": 1.0, "seed": consumer_seed})
    assert posted.status_code == 201, posted.text
    body = posted.json()
    assert body["request_id"] == 1
    assert body["draw"] == {"temperature": 2.0, "top_p": 1.0, "seed": seed}

    (served,) = node.poll_once()
    shown = client.get(f"/v1/requests/{body['request_id']}").json()
    assert shown["draw"] == body["draw"] and shown["status"] == "committed"
    assert shown["claim"]["output"] == answer != greedy

    refused = client.post("/v1/requests", headers={"X-API-Key": API_KEY},
                          json={"prompt": "12+34=", "max_tokens": 40, "temperature": 0.01})
    assert refused.status_code == 400 and "temperature 0.01 is outside" in refused.text
