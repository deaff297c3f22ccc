"""``optinfer bench watchtower``: how many claims per second one watchtower process verifies.

A fresh anvil with the protocol deployed and tiny-r1 registered; a provider commits tiny-r1's
honest answers to a burst of requests (a few prompts, many requests each); then one
watchtower (eager mode, SQLite) scans them all and verifies them `batch` at a time
(``Watchtower.verify_many``, as a ``verify_many`` task does; 1: one at a time):
`claims_per_s` is claims over the time from the start of the scan to the last verdict.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from eth_account.signers.local import LocalAccount
from web3 import Web3

from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec
from optinfer.contracts.sender import TxSender
from optinfer.models.bench import cpu_name

ETHER = 10**18
FEE = ETHER // 100
# "a+b=" prompts tiny-r1 answers with an EOS well inside MAX_TOKENS.
PROMPTS = ("12+34=", "5+7=", "23+19=", "40+2=", "8+8=", "31+11=", "9+90=", "66+3=")
MAX_TOKENS = 40


def honest_answers(model, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy answer) for each text."""
    answers = []
    for text in texts:
        prompt = model.encode(text)
        answers.append((prompt, model.generate(prompt, MAX_TOKENS)))
    return answers


def commit_claims(w3: Web3, coordinator: InferenceCoordinator, model_id: bytes,
                  consumer: LocalAccount, provider: LocalAccount,
                  answers: Sequence[tuple[list[int], list[int]]], count: int) -> list[int]:
    """Post `count` requests (cycling through `answers`' prompts) and commit each answer, as
    fast as the node takes them: every transaction is sent before any receipt is awaited.
    The request ids, in order."""
    deadline = w3.eth.get_block("latest")["timestamp"] + 3600
    asker, answerer = TxSender(w3, consumer), TxSender(w3, provider)
    # Gas and fees fixed once: estimating each of hundreds of transactions is most of the time.
    fixed = {"gas": 1_000_000, "gasPrice": 2 * w3.eth.gas_price}
    posted = []
    for index in range(count):
        prompt, _ = answers[index % len(answers)]
        spec = RequestSpec(model_id=model_id, prompt=list(prompt), max_tokens=MAX_TOKENS,
                           commit_deadline=deadline)
        posted.append(asker.submit({**coordinator.post_request_tx(spec, FEE), **fixed},
                                   coordinator.artifact))
    ids = [coordinator.events(asker.wait(tx), "RequestPosted")[0]["requestId"] for tx in posted]
    committed = []
    for index, request_id in enumerate(ids):
        _, output = answers[index % len(answers)]
        committed.append(answerer.submit({**coordinator.commit_output_tx(request_id, output),
                                          **fixed}, coordinator.artifact))
    for tx in committed:
        answerer.wait(tx)
    return ids


def bench_watchtower(claims: int = 200, prompts: int = len(PROMPTS), batch: int = 16,
                     log: Callable[[str], None] = lambda _: None,
                     model_dir: Path | None = None) -> dict:
    from optinfer.challenger.watchtower import Watchtower
    from optinfer.contracts.localchain import start_anvil
    from optinfer.contracts.registry import ModelRegistry, ModelSpec
    from optinfer.models.runtime import IntegerModel
    from optinfer.prover.game import Role
    from optinfer.services import store as st
    from optinfer.services.chain import connect
    from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS, DeployParams, deploy_all
    from optinfer.services.settings import load_settings

    if claims < 1 or not 1 <= prompts <= len(PROMPTS) or batch < 1:
        raise ValueError(f"claims >= 1, prompts in 1..{len(PROMPTS)}, batch >= 1")
    # The committed tiny-r1 unless configured or given.
    model_dir = Path(model_dir) if model_dir is not None else load_settings().model_path
    with tempfile.TemporaryDirectory(prefix="optinfer-bench-") as tmp, start_anvil() as chain:
        w3 = connect(chain.url)
        deployer, provider, consumer = chain.accounts[0], chain.accounts[1], chain.accounts[3]
        params = DeployParams(coordinator=replace(DEMO_COORDINATOR_PARAMS))
        deployments = deploy_all(w3, deployer, params)
        deployments_file = Path(tmp) / "deployments.json"
        deployments.write(deployments_file)
        model_spec = ModelSpec.from_manifest(model_dir / "manifest.json")
        ModelRegistry(w3, deployments.address("ModelRegistry")).register_send(model_spec,
                                                                              deployer)
        coordinator = InferenceCoordinator(w3, deployments.address("InferenceCoordinator"))
        stake = DEMO_COORDINATOR_PARAMS.minimum_stake + claims * (
            DEMO_COORDINATOR_PARAMS.stake_per_claim)
        coordinator.register_provider_send(stake, provider)

        model = IntegerModel(model_dir)
        answers = honest_answers(model, PROMPTS[:prompts])
        log(f"committing {claims} honest claims over {prompts} prompt(s)...")
        started = time.perf_counter()
        commit_claims(w3, coordinator, model_spec.model_id, consumer, provider, answers,
                      claims)
        commit_seconds = time.perf_counter() - started

        settings = load_settings(rpc_url=chain.url, deployments=deployments_file,
                                 database_url=f"sqlite:///{Path(tmp) / 'watchtower.db'}",
                                 state_dir=Path(tmp), model_dir=model_dir)
        watchtower = Watchtower.start(settings)
        log("scanning and verifying...")
        started = time.perf_counter()
        scanned = watchtower.scan()
        scan_seconds = time.perf_counter() - started
        each = []  # per claim: its chunk's time over the chunk's claims
        for first in range(0, len(scanned.verify), batch):
            chunk = scanned.verify[first:first + batch]
            begun = time.perf_counter()
            watchtower.verify_many(chunk)
            each += [(time.perf_counter() - begun) / len(chunk)] * len(chunk)
        total = time.perf_counter() - started
        with watchtower.store.transaction() as conn:
            verdicts = [st.get_claim(conn, request_id).verdict for request_id in scanned.verify]
            games = st.game_status_counts(conn, Role.CHALLENGER)
        watchtower.close()

    valid = sum(verdict == "valid" for verdict in verdicts)
    return {
        "model": model_dir.parent.name if model_dir.name == "integer" else model_dir.name,
        "claims": claims,
        "prompts": prompts,
        "verify_batch": batch,
        "claims_seen": scanned.new_claims,
        "valid": valid,
        "disputed": sum(games.values()),
        "claims_per_s": round(len(verdicts) / total, 1),
        "scan_seconds": round(scan_seconds, 3),
        "verify_ms_median": round(statistics.median(each) * 1000, 2),
        "verify_ms_p95": round(sorted(each)[int(0.95 * (len(each) - 1))] * 1000, 2),
        "commit_seconds": round(commit_seconds, 2),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }
