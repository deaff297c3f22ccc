"""The API over the database the real provider node fills: a request posted through the API is
served by the node (in-process, one step at a time), and the API shows it committed with its
answer, counts it in the metrics, and shows it finalized once the node finalizes it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from optinfer.contracts.registry import ModelRegistry
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
