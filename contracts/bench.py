"""`optinfer bench dispute`: a whole dispute on anvil at DeepSeek-R1-Distill-Qwen-1.5B shape.

A random-weight checkpoint of the real width (a few layers: gas per op does not depend on the
depth) is converted once and cached. A provider commits a wrong answer whose trace lies in one
element of the widest MatMulInteger (K = 8960, the costliest one-step); an honest challenger
disputes it and both play `prover.game.decide` against the real contracts until the one-step
convicts the provider. Reported: rounds by phase, gas of every move, the one-step's gas for the
worst node of every op type (honest witnesses, `eth_estimateGas`), commit gas, totals per side,
wall time, each party's compute time and the process's peak memory. The chain enforces
EIP-7825's 2**24 gas cap per transaction; the same model registered at the registry's largest
max context is asked the largest request, committed and challenged
(`challenge_gas_at_max_request`), and `max_tx_gas` is the most gas any of these transactions
used. Rounds for the full
28-layer model follow from its node count (`game.max_rounds`). With `sampling` the model is
converted with sampling graphs and the request asks for a draw (T 0.6, top-p 0.95):
`sampler_one_step_gas` is then the one-step of the costliest node of every op type among the
sampler's nodes (issue 22's bound: 1.5M).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import numpy as np

from optinfer.errors import UserError
from optinfer.models.bench import cpu_name, peak_rss_bytes_of_process

BENCH_CONTEXT = 64
FULL_LAYERS = 28
ETHER = 10**18


#: The draw a sampled benchmark request asks for (DeepSeek's guidance for the R1 distills);
#: the seed is the consumer's.
BENCH_DRAW = (600, 950, 7)
SAMPLER_NODES = "sample"  # the prefix of the sampler's node names (`sampling.sample_tokens`)


def prepare_model(workdir: Path, layers: int, log, sampling: bool = False) -> Path:
    """The converted random R1-shape model under `workdir` (written once), with sampling
    graphs when `sampling`."""
    from optinfer.models.checkpoint import write_random_checkpoint
    from optinfer.models.converter import convert

    checkpoint = workdir / "checkpoint"
    integer = workdir / ("integer-sampling" if sampling else "integer")
    if not (checkpoint / "config.json").is_file():
        log(f"writing a random R1-Distill-1.5B-shape checkpoint ({layers} layers) to {workdir}")
        write_random_checkpoint(checkpoint, preset="r1-distill-1.5b", num_layers=layers)
    if not (integer / "manifest.json").is_file():
        log("converting to the integer model")
        convert(checkpoint, integer, max_context=BENCH_CONTEXT, sampling=sampling)
    return integer


def _full_model_nodes(model, layers: int) -> int:
    """Node count of the same graph with 28 layers: the non-layer nodes plus 28 times one
    layer's (every layer has the same nodes, named ``L{i}.``)."""
    names = [node.name or node.output[0] for node in model.verify_graph().graph.node]
    per_layer = sum(1 for name in names if name.startswith("L0."))
    return len(names) + (FULL_LAYERS - layers) * per_layer


def _worst_nodes(model, trace, prefix: str = "") -> dict[str, int]:
    """Per op type, the node whose one-step opens the most input bytes (the largest fan-in):
    the costliest one-step of that op; among the nodes whose names start with `prefix`."""
    from optinfer.models import opset

    graph = model.verify_graph().graph
    worst: dict[str, tuple[int, int]] = {}
    for k, node in enumerate(graph.node, 1):
        if not node.name.startswith(prefix):
            continue
        witness = trace.one_step_witness(k, trace.tensor(k).size - 1) \
            if trace.tensor(k).size else None
        if witness is None:
            continue
        size = witness.byte_size()
        if node.op_type in opset.OPS and size > worst.get(node.op_type, (0, 0))[1]:
            worst[node.op_type] = (k, size)
    return {op: k for op, (k, _) in sorted(worst.items())}


MAX_OUTPUT_TOKENS = (24_576 - 1) // 4
"""`TokenPacking.MAX_TOKENS`: the most output tokens a claim's data contract can hold."""


def largest_request_gas(w3, coordinator, game, model_id: bytes, output_tokens: int,
                        accounts, eos_token_ids=(), vocabulary: int = 151_936) -> dict:
    """Post, commit and challenge the largest request a model registered at max context
    ``MAX_CONTEXT_TOKENS`` accepts, with ``output_tokens`` of it output (``accounts``: the
    consumer, a registered provider, the challenger). Every id is among the top 2000 of
    ``vocabulary`` (never one of ``eos_token_ids``: the output runs to max tokens), so the
    calldata is as dear as real ids make it. Returns the three transactions' gas, and the
    request and game ids."""
    from optinfer.contracts.coordinator import RequestSpec
    from optinfer.contracts.registry import MAX_CONTEXT_TOKENS

    ids = [t for t in range(vocabulary - 2000, vocabulary) if t not in set(eos_token_ids)]
    consumer, provider, challenger = accounts
    prompt = [ids[i % len(ids)] for i in range(MAX_CONTEXT_TOKENS - output_tokens + 1)]
    output = [ids[(7 * i) % len(ids)] for i in range(output_tokens)]
    request = RequestSpec(model_id=model_id, prompt=prompt, max_tokens=output_tokens,
                          commit_deadline=w3.eth.get_block("latest")["timestamp"] + 600)
    posted = coordinator.post_request_send(request, 10**16, consumer)
    request_id = coordinator.events(posted, "RequestPosted")[0]["requestId"]
    committed = coordinator.commit_output_send(request_id, output, provider)
    game_id = game.challenge_send(request_id, prompt, challenger)
    opened = game.contract.events.GameOpened.get_logs(
        argument_filters={"gameId": game_id}, from_block=0)[0]
    challenged = w3.eth.get_transaction_receipt(opened["transactionHash"])
    return {"post": posted["gasUsed"], "commit": committed["gasUsed"],
            "challenge": challenged["gasUsed"], "request_id": request_id, "game_id": game_id}


def bench_dispute(layers: int = 2, prompt_len: int = 4, tokens: int = 3,
                  workdir: Path | None = None, model_dir: Path | None = None,
                  log=print, sampling: bool = False) -> dict:
    """Run the dispute benchmark; the JSON document (see the module docstring). `model_dir`
    runs it on an already converted model instead (tiny-r1 in the tests); `sampling` asks for
    a drawn answer (a sampling model's)."""
    if not 1 <= layers <= FULL_LAYERS:
        raise UserError(f"--layers must be in 1..{FULL_LAYERS}")
    if prompt_len < 1 or tokens < 1 or prompt_len + tokens > BENCH_CONTEXT:
        raise UserError(f"prompt and tokens must be positive, together at most {BENCH_CONTEXT}")
    from optinfer.contracts.bindings import TX_GAS_LIMIT_CAP
    from optinfer.contracts.coordinator import CoordinatorParams, InferenceCoordinator, RequestSpec
    from optinfer.contracts.dispute_game import DisputeGame, GameParams
    from optinfer.contracts.localchain import start_anvil
    from optinfer.contracts.one_step_binding import OneStepVerifier, one_step_gas
    from optinfer.contracts.registry import MAX_CONTEXT_TOKENS, ModelRegistry, ModelSpec
    from optinfer.models.runtime import IntegerModel
    from optinfer.models.sampling import Sampling
    from optinfer.prover import game as spec
    from optinfer.prover.game import ModelTrace, Role

    started = time.perf_counter()
    workdir = Path(workdir or Path.home() / ".cache" / "optinfer"
                   / f"r1-distill-1.5b-{layers}l-ctx{BENCH_CONTEXT}")
    integer = Path(model_dir) if model_dir else prepare_model(
        workdir, layers, log, sampling)
    model = IntegerModel(integer, threads=1)
    if sampling and not model.samples:
        raise UserError(f"{integer} decodes greedily only: --sampling needs a model converted "
                        "with --sampling")
    layers = model.manifest["config"]["num_layers"]
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, model.manifest["config"]["vocab_size"],
                                           prompt_len)]
    compute = defaultdict(float)
    graph = model.verify_graph().graph

    log("starting anvil (EIP-7825's 2**24 gas cap per transaction) and deploying")
    with start_anvil(extra_args=("--enable-tx-gas-limit",)) as chain:
        w3 = chain.web3()
        deployer, provider, consumer, challenger = chain.accounts[:4]
        model_spec = ModelSpec.from_manifest(integer / "manifest.json", manifest_uri="bench")
        registry = ModelRegistry.deploy(w3, deployer)
        registry.register_send(model_spec, deployer)
        params = CoordinatorParams(minimum_stake=ETHER, stake_per_claim=ETHER // 2,
                                   challenge_window=3600, challenger_share_bps=5000,
                                   consumer_share_bps=3000, max_callback_gas_limit=500_000)
        coordinator = InferenceCoordinator.deploy(w3, deployer, registry.address, params)
        verifier = OneStepVerifier.deploy(w3, deployer)
        game = DisputeGame.deploy(w3, deployer, coordinator.address, verifier.address,
                                  GameParams(challenger_bond=ETHER // 10))
        coordinator.set_dispute_game_send(game.address, deployer)
        coordinator.register_provider_send(4 * ETHER, provider)  # the max-request claims too
        request = RequestSpec(model_id=model_spec.model_id, prompt=prompt,
                              max_tokens=tokens,
                              commit_deadline=w3.eth.get_block("latest")["timestamp"] + 600,
                              sampling=Sampling(*BENCH_DRAW) if sampling else Sampling())
        receipt = coordinator.post_request_send(request, ETHER // 100, consumer)
        request_id = coordinator.events(receipt, "RequestPosted")[0]["requestId"]
        draw = coordinator.get_request(request_id).draw  # the seed is the chain's

        log(f"generating {tokens} tokens after a {prompt_len}-token prompt")
        output = model.generate(prompt, tokens, draw=draw)
        t0 = time.perf_counter()
        honest = ModelTrace.from_model(model, prompt, output, draw)
        compute["challenger"] += time.perf_counter() - t0
        # The liar's trace: one element of the widest MatMulInteger wrong, and the last token.
        lie_at = max((k for k, n in enumerate(graph.node, 1) if n.op_type == "MatMulInteger"),
                     key=lambda k: honest.one_step_witness(k, 0).byte_size())
        t0 = time.perf_counter()
        claimed = list(output)
        claimed[-1] = (claimed[-1] + 1) % model.manifest["config"]["vocab_size"]
        lie = honest.tensor(lie_at).copy()
        lie.reshape(-1)[0] += 1
        liar = honest.with_output(lie_at, lie).with_output(
            honest.node_count, np.asarray(claimed, np.int64))
        compute["provider"] += time.perf_counter() - t0 + compute["challenger"]
        commit_gas = coordinator.commit_output_send(request_id, claimed, provider)["gasUsed"]

        log("playing the dispute")
        committed = honest.committed
        game_id = game.challenge_send(request_id, prompt, challenger)
        opened = game.contract.events.GameOpened.get_logs(
            argument_filters={"gameId": game_id}, from_block=0)[0]
        challenge_gas = w3.eth.get_transaction_receipt(opened["transactionHash"])["gasUsed"]
        players = {Role.PROVIDER: (liar, provider), Role.CHALLENGER: (honest, challenger)}
        moves: list[dict] = []
        while True:
            state = game.state(game_id).state
            if state.phase is spec.Phase.RESOLVED:
                break
            role = state.to_move
            trace, signer = players[role]
            t0 = time.perf_counter()
            (action,) = spec.decide(state, trace, role, w3.eth.get_block("latest")["timestamp"])
            compute[role.value] += time.perf_counter() - t0
            receipt = game.submit(game_id, action, signer, state)
            moves.append({"role": role.value, "move": type(action).__name__,
                          "phase": state.phase.value, "gas": receipt["gasUsed"]})
        receipt_gas = {"challenge": challenge_gas, "commit": commit_gas}

        log("measuring the one-step of every op type")
        worst = _worst_nodes(model, honest)
        one_step = {op: one_step_gas(w3, verifier, committed, honest, k)
                    for op, k in worst.items()}
        sampler_nodes = _worst_nodes(model, honest, SAMPLER_NODES) if sampling else {}
        sampler_one_step = {op: one_step_gas(w3, verifier, committed, honest, k)
                            for op, k in sampler_nodes.items()}

        log(f"the largest request: {MAX_CONTEXT_TOKENS} tokens of context")
        widest = dataclasses.replace(model_spec, max_context=MAX_CONTEXT_TOKENS)
        registry.register_send(widest, deployer)
        at_max = {tokens: largest_request_gas(w3, coordinator, game, widest.model_id, tokens,
                                              (consumer, provider, challenger),
                                              widest.eos_token_ids)
                  for tokens in (1, MAX_OUTPUT_TOKENS)}

    rounds = Counter(m["phase"] for m in moves if m["role"] == "provider")
    per_side = {side: sum(m["gas"] for m in moves if m["role"] == side)
                for side in ("provider", "challenger")}
    per_side["challenger"] += receipt_gas["challenge"]
    bisection_moves = [m["gas"] for m in moves if m["phase"] in ("bisection", "await_root")]
    full_nodes = _full_model_nodes(model, layers)
    largest = max(honest.tensor(k).nbytes for k in range(honest.node_count + 1))
    return {
        "model": str(model_dir) if model_dir
        else f"R1-Distill-Qwen-1.5B shape, random weights, {layers} layers",
        "nodes": honest.node_count,
        "prompt_tokens": prompt_len, "generated_tokens": len(output),
        "lie": {"node": lie_at, "op": graph.node[lie_at - 1].op_type,
                "name": graph.node[lie_at - 1].name},
        "winner": state.winner.value,
        "rounds": {**dict(rounds), "total": state.rounds},
        "moves": moves,
        "one_step_gas": one_step,
        "one_step_nodes": {op: graph.node[k - 1].name for op, k in worst.items()},
        "max_one_step_gas": max(one_step.values()),
        "draw": {"temperature": draw.temperature, "top_p": draw.top_p, "seed": draw.seed},
        **({"sampler_one_step_gas": sampler_one_step,
            "sampler_one_step_nodes": {op: graph.node[k - 1].name
                                       for op, k in sampler_nodes.items()},
            "max_sampler_one_step_gas": max(sampler_one_step.values())} if sampling else {}),
        "max_move_gas": max(m["gas"] for m in moves if m["move"] != "OneStep"),
        "max_bisection_move_gas": max(bisection_moves),
        "commit_gas": receipt_gas["commit"],
        "challenge_gas": receipt_gas["challenge"],
        "max_request": {"context_tokens": MAX_CONTEXT_TOKENS, **{
            f"output_{tokens}": {key: gas for key, gas in measured.items()
                                 if key in ("post", "commit", "challenge")}
            for tokens, measured in at_max.items()}},
        "challenge_gas_at_max_request": max(m["challenge"] for m in at_max.values()),
        "commit_gas_at_max_request": max(m["commit"] for m in at_max.values()),
        "max_tx_gas": max(*(m["gas"] for m in moves), *one_step.values(),
                          *receipt_gas.values(),
                          *(m[key] for m in at_max.values()
                            for key in ("post", "commit", "challenge"))),
        "tx_gas_cap": TX_GAS_LIMIT_CAP,
        "total_gas": {**per_side, "dispute": per_side["provider"] + per_side["challenger"]},
        "full_model": {"layers": FULL_LAYERS, "nodes": full_nodes,
                       "bisection_rounds": math.ceil(math.log2(full_nodes)),
                       "max_rounds": spec.max_rounds(full_nodes, largest)},
        "compute_s": {side: round(seconds, 3) for side, seconds in compute.items()},
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_bytes": peak_rss_bytes_of_process(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "date": date.today().isoformat(),
    }

