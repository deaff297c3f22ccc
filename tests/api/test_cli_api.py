"""``optinfer request`` and ``optinfer api`` as processes against anvil, with the provider
played in-process: it commits tiny-r1's answer with the coordinator binding, the test moves
the chain's clock past the challenge window and finalizes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from optinfer.contracts.coordinator import InferenceCoordinator, Status, token_hash
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import TxSender
from optinfer.models.runtime import IntegerModel
from optinfer.services import consumer
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS
from optinfer.services.model_fetch import fetch_model
from optinfer.services.store import CONNECT_ATTEMPTS
from tests.chat_models import THINK, tiny_r1_with_chat_template

from .conftest import API_KEY, ETHER, TINY_R1

OPTINFER = str(Path(sys.executable).parent / "optinfer")
MODEL = IntegerModel(TINY_R1)
PROMPT = "12+34="
OPERATORS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operators.md"
# The commands docs/operators.md shows, run here as shown.
DOCUMENTED_REQUEST = ["request", "--prompt", PROMPT, "--max-tokens", "40", "--wait"]
DOCUMENTED_API = ["api"]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The commands here read no database but the API's: SQLite is enough."""
    return f"sqlite:///{tmp_path / 'node.db'}"


@pytest.fixture
def env(chain, deployments_file: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a consumer on the test chain (the consumer key: anvil's account 3)."""
    values = {name: value for name, value in os.environ.items()
              if not name.startswith("OPTINFER_") or name == "OPTINFER_ANVIL"}
    values.update(OPTINFER_RPC_URL=chain.url, OPTINFER_DEPLOYMENTS=str(deployments_file),
                  OPTINFER_STATE_DIR=str(tmp_path / "state"), OPTINFER_POLL_INTERVAL="0.1")
    return values


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([OPTINFER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def posted_request(coordinator: InferenceCoordinator, before: int, process: subprocess.Popen,
                   timeout: float = 60) -> dict:
    """The RequestPosted event of the request the command posts (waits for it)."""
    deadline = time.monotonic() + timeout
    while coordinator.parameter("requestCount") == before:
        if process.poll() is not None:
            pytest.fail(f"the command exited first: {process.communicate()}")
        assert time.monotonic() < deadline, "the command posted nothing"
        time.sleep(0.1)
    (event,) = coordinator.contract.events.RequestPosted.get_logs(
        from_block=0, argument_filters={"requestId": before + 1})
    return dict(event["args"])


def read_until(process: subprocess.Popen, text: str) -> str:
    """The command's stderr up to the line holding `text` (which must come)."""
    lines = []
    while not lines or text not in lines[-1]:
        line = process.stderr.readline()
        assert line, "".join(lines) + f"... ended before {text!r}"
        lines.append(line)
    return "".join(lines)


def advance(w3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def test_request_wait_prints_the_finalized_answer(env, chain, w3, coordinator):
    provider = chain.accounts[1]
    coordinator.register_provider_send(2 * ETHER, provider)
    before = coordinator.parameter("requestCount")
    process = start(["request", "--prompt", PROMPT, "--max-tokens", "40", "--fee", "12345",
                     "--wait", "--json"], env)
    request = posted_request(coordinator, before, process)
    assert request["consumer"] == chain.accounts[3].address
    assert (request["maxTokens"], request["fee"]) == (40, 12345)
    answer = MODEL.generate(list(request["prompt"]), request["maxTokens"])
    coordinator.commit_output_send(request["requestId"], answer, provider)
    # The command reports the claim while the challenge window runs.
    seen = read_until(process, f"answered by {provider.address}")
    advance(w3, DEMO_COORDINATOR_PARAMS.challenge_window + 1)
    coordinator.finalize_send(request["requestId"], provider)
    stdout, stderr = process.communicate(timeout=60)
    stderr = seen + stderr
    assert process.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["request_id"] == request["requestId"]
    assert result["status"] == "finalized"
    assert result["output_tokens"] == answer
    assert result["text"] == MODEL.decode_text(answer) == "<think>2+4+0=06 1+3+0=04</think>46"
    assert result["provider"] == provider.address
    assert f"posted request {request['requestId']}" in stderr


def test_request_wait_prints_the_answer_text(env, chain, w3, coordinator):
    provider = chain.accounts[1]
    coordinator.register_provider_send(2 * ETHER, provider)
    before = coordinator.parameter("requestCount")
    process = start(DOCUMENTED_REQUEST, env)
    request = posted_request(coordinator, before, process)
    answer = MODEL.generate(list(request["prompt"]), 40)
    coordinator.commit_output_send(request["requestId"], answer, provider)
    advance(w3, DEMO_COORDINATOR_PARAMS.challenge_window + 1)
    coordinator.finalize_send(request["requestId"], provider)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert stdout == "<think>2+4+0=06 1+3+0=04</think>46\n"


def test_request_nobody_answers_exits_2_with_the_reason(env, w3, coordinator):
    before = coordinator.parameter("requestCount")
    process = start(["request", "--prompt", PROMPT, "--max-tokens", "8",
                     "--commit-seconds", "60", "--wait"], env)
    request = posted_request(coordinator, before, process)
    advance(w3, 61)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stdout == ""
    assert (f"request {request['requestId']}: no provider committed an answer before its "
            "deadline") in stderr
    assert "Traceback" not in stderr


def test_a_refunded_request_is_reported_as_not_served(chain, w3, coordinator):
    posted = consumer.post_request(coordinator, TxSender(w3, chain.accounts[5]), MODEL,
                                   MODEL.encode(PROMPT), max_tokens=8, fee=100,
                                   commit_seconds=60)
    advance(w3, 61)
    coordinator.refund_send(posted.request_id, chain.accounts[5])
    with pytest.raises(consumer.RequestNotServed, match="was refunded"):
        consumer.wait_for_result(coordinator, posted.request_id, poll_interval=0.05)
    assert coordinator.get_request(posted.request_id).status == Status.REFUNDED


def test_request_without_wait_prints_the_id(env, coordinator):
    before = coordinator.parameter("requestCount")
    done = subprocess.run([OPTINFER, "request", "--prompt", PROMPT, "--max-tokens", "4"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{before + 1}\n"
    assert coordinator.get_request(before + 1).status == Status.OPEN


def test_a_sampled_request_shows_the_draw_the_chain_fixed(env, chain, w3, deployment,
                                                         coordinator):
    """`optinfer request --temperature --top-p --seed` on a sampling model: the request is
    posted with the consumer's seed, and the draw printed is the chain's (its seed derived from
    the consumer's and the request id)."""
    from optinfer.contracts.coordinator import draw_seed
    from optinfer.models.tiny_r1 import SAMPLING_DIR

    ModelRegistry(w3, deployment.address("ModelRegistry")).register_send(
        ModelSpec.from_manifest(SAMPLING_DIR / "manifest.json"), chain.accounts[0])
    done = subprocess.run([OPTINFER, "request", "--prompt", PROMPT, "--max-tokens", "4",
                           "--model", str(SAMPLING_DIR), "--temperature", "0.6", "--top-p",
                           "0.95", "--seed", "5", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    request_id = summary["request_id"]
    seed = draw_seed(w3.eth.chain_id, coordinator.address, request_id,
                     chain.accounts[3].address, 5)
    assert summary["draw"] == {"temperature": 600, "top_p": 950, "seed": seed}
    stored = coordinator.get_request(request_id)
    assert (stored.temperature, stored.top_p, stored.seed) == (600, 950, seed)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hello"], "cannot encode the prompt"),
    (["--prompt", PROMPT, "--max-tokens", "500"], "exceed the model's context of 128"),
    (["--prompt", PROMPT, "--fee", str(2**96)], "fee must be between 0 and 2**96 - 1"),
    (["--prompt", PROMPT, "--commit-seconds", "0"], "must be at least 60 s away, got 0"),
    (["--prompt", PROMPT, "--chat"], "has no chat template"),
    (["--prompt", PROMPT, "--temperature", "0.6"], "decodes greedily only (temperature 0)"),
    (["--prompt", PROMPT, "--temperature", "0.6", "--top-p", "0"], "top-p 0 is outside"),
    (["--prompt", PROMPT, "--temperature", "0.6", "--seed", "-1"], "seed -1 is outside"),
])
def test_request_refuses_bad_input_in_one_line(env, coordinator, args, message):
    before = coordinator.parameter("requestCount")
    done = subprocess.run([OPTINFER, "request", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert coordinator.parameter("requestCount") == before


def test_request_chat_posts_the_prompt_in_the_models_template(env, chain, w3, deployment,
                                                              coordinator, tmp_path):
    model_dir = tiny_r1_with_chat_template(tmp_path / "tiny-r1-chat")
    spec = ModelSpec.from_manifest(model_dir / "manifest.json")
    ModelRegistry(w3, deployment.address("ModelRegistry")).register_send(spec, chain.accounts[0])
    done = subprocess.run([OPTINFER, "request", "--model", str(model_dir), "--prompt", PROMPT,
                           "--chat", "--system", "9", "--max-tokens", "4", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    posted = json.loads(done.stdout)
    expected = [1, 14, 17, *MODEL.encode(PROMPT)[1:], THINK]  # BOS, "9 ", the question, <think>
    assert posted["prompt_tokens"] == expected
    on_chain = coordinator.get_request(posted["request_id"])
    assert on_chain.prompt_hash == token_hash(expected)
    assert on_chain.model_id == spec.model_id


def test_api_command_serves_the_model_to_model_fetch(env, w3, deployment, tmp_path):
    """`optinfer api` on one side, `optinfer model fetch` (as docs/operators.md shows it) and
    fetch_model on the other: the download is kept only for the registered id."""
    env = {**env, "OPTINFER_API_KEY": API_KEY,
           "OPTINFER_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}"}
    process = start([*DOCUMENTED_API, "--port", "0"], env)  # a free port, not 8000
    try:
        started = read_until(process, "Uvicorn running on")
        url = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", started).group(1)
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        (model,) = httpx.get(f"{url}/v1/models").json()["models"]
        registry = ModelRegistry(w3, deployment.address("ModelRegistry"))
        dest = fetch_model(url, model["id"], tmp_path / "fetched", registry)
        assert (dest / "weights.bin").read_bytes() == (TINY_R1 / "weights.bin").read_bytes()

        fetched = subprocess.run(
            [OPTINFER, *documented_fetch(url, model["id"], tmp_path / "cli"), "--json"],
            env=env, capture_output=True, text=True, timeout=120)
        assert fetched.returncode == 0, fetched.stderr
        summary = json.loads(fetched.stdout)
        assert summary["model_id"] == model["id"] and summary["registry"] == registry.address
        assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(
            p.name for p in TINY_R1.iterdir() if p.name in summary_files(TINY_R1))
        assert (tmp_path / "cli" / "weights.bin").read_bytes() == (
            TINY_R1 / "weights.bin").read_bytes()

        unknown = "0x" + "ab" * 32
        refused = subprocess.run([OPTINFER, *documented_fetch(url, unknown, tmp_path / "no")],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1].startswith("error: ")
        assert "Traceback" not in refused.stderr and not (tmp_path / "no").exists()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 0


def documented_fetch(url: str, model_id: str, out: Path) -> list[str]:
    """`optinfer model fetch` as docs/operators.md shows it, with this test's values."""
    doc = OPERATORS_DOC.read_text(encoding="utf-8")
    (line,) = [line for line in doc.splitlines() if "optinfer model fetch" in line
               and line.startswith(".venv/bin/")]
    args = shlex.split(line)[1:]
    return [url if a == "http://provider:8000" else model_id if a == "0xMODEL_ID"
            else str(out) if a == "models/fetched" else a for a in args]


def summary_files(model_dir: Path) -> set[str]:
    """The manifest and the files it lists."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return {"manifest.json", *manifest["files"]}


def test_the_documented_commands_are_the_tested_ones():
    doc = OPERATORS_DOC.read_text(encoding="utf-8")
    sections = [doc.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
                for title in ("HTTP API", "Requests from the command line")]
    blocks = [block for section in sections
              for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]
    commands = [shlex.split(line) for block in blocks for line in block.strip().splitlines()]
    assert commands == [
        ["OPTINFER_API_KEY=a-long-random-secret", ".venv/bin/optinfer", *DOCUMENTED_API],
        [".venv/bin/optinfer", *DOCUMENTED_REQUEST],
    ]


def test_api_command_with_an_unreachable_database_says_so_in_one_line(env):
    """After its logged attempts: one line, exit status 2."""
    env = {**env, "OPTINFER_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"}
    done = subprocess.run([OPTINFER, "api", "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    *tries, last = done.stderr.strip().splitlines()
    assert "unreachable" in last and "127.0.0.1:1" in last
    # Each attempt but the last is logged, one line each (a bounded, logged retry).
    assert len(tries) == CONNECT_ATTEMPTS - 1
    assert all("trying again" in line for line in tries) and "Traceback" not in done.stderr
