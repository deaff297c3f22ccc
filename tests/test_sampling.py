"""The integer sampler (`optinfer.models.sampling`, issue 22): ONNX Runtime equals the numpy
reference, temperature 0 is the argmax, and the empirical token frequencies over many seeds
match the float model's tempered, top-p-truncated softmax of the same logits."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optinfer.errors import UserError
from optinfer.models import manifest, opset, reference, sampling
from optinfer.models.batching import generate_batched, predict_many
from optinfer.models.runtime import IntegerModel, session_options
from optinfer.models.sampling import Sampling

from .conftest import TINY_CONTEXT

VOCAB = 4096  # two chunks of 2,048
SCALE = 1e-3  # real logit = integer * SCALE
LOGIT_BOUND = 1 << 24
SIGNIFICANCE = 1e-3  # a chi-square test fails below this p-value


@pytest.fixture(scope="module")
def sampler() -> onnx.ModelProto:
    return sampling.sampler_model(VOCAB, sampling.sum_chunk(VOCAB),
                                  sampling.IndexScale.for_logits(SCALE), -LOGIT_BOUND,
                                  LOGIT_BOUND)


@pytest.fixture(scope="module")
def session(sampler):
    return _session(sampler, 2)


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def _logits(seed: int, lead: float = 4.0) -> np.ndarray:
    """One row of LM-like logits: twenty candidates `lead` nats above a normal crowd. At
    temperature 0.6 and top-p 0.95 the nucleus holds about 500 tokens, the largest 40%."""
    rng = np.random.default_rng(seed)
    real = rng.normal(0, 1.0, VOCAB)
    real[rng.choice(VOCAB, 20, replace=False)] += lead
    return np.rint(real / SCALE).astype(np.int32)


def _feeds(logits: np.ndarray, temperature: float, top_p: float, seeds, positions) -> dict:
    rows = len(seeds)
    column = lambda values: np.asarray(values, np.int64).reshape(rows, 1)  # noqa: E731
    return {"logits": np.broadcast_to(logits, (rows, VOCAB)).copy(),
            "temperature": column([round(temperature * 1000)] * rows),
            "top_p": column([round(top_p * 1000)] * rows),
            "seed": column(seeds), "positions": column(positions)}


def _float_distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logit / T) over the smallest most-probable set reaching top_p, renormalised
    (the float reference of what the sampler draws from)."""
    tempered = logits.astype(np.float64) * SCALE / temperature
    q = np.exp(tempered - tempered.max())
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    keep = int(np.searchsorted(np.cumsum(q[order]), top_p - 1e-12)) + 1
    kept = np.zeros(VOCAB, bool)
    kept[order[:keep]] = True
    q = np.where(kept, q, 0.0)
    return q / q.sum()


def _chi_square_p_value(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test of `counts` against `expected`, tokens expected under 5 times pooled;
    the p-value by the Wilson-Hilferty approximation of the chi-square distribution."""
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    if wanted[-1] < 5:
        observed, wanted = observed[:-1], wanted[:-1]
    dof = len(observed) - 1
    if dof < 1:
        return 1.0
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _outside_the_nucleus(logits: np.ndarray, tokens: np.ndarray, temperature: float,
                         expected: np.ndarray) -> int:
    """Draws below the float nucleus's last token by more than the sampler's resolution
    (the exp table's 1/256 nat, twice: the table index and the row max both round)."""
    tempered = logits.astype(np.float64) * SCALE / temperature
    floor = tempered[expected > 0].min() - 2 / (1 << sampling.EXP_FRAC_BITS)
    return int((tempered[tokens] < floor).sum())


@pytest.mark.parametrize(("temperature", "top_p"), [(0.6, 0.95), (1.0, 1.0), (1.5, 0.9)])
def test_token_frequencies_over_seeds_match_the_float_tempered_top_p_softmax(
        session, temperature, top_p):
    logits = _logits(1)
    rows = 6000
    seeds = np.random.default_rng(2).integers(0, sampling.SEED_LIMIT, rows)
    (tokens,) = session.run(None, _feeds(logits, temperature, top_p, seeds, [7] * rows))
    expected = _float_distribution(logits, temperature, top_p)
    counts = np.bincount(tokens, minlength=VOCAB)
    assert _outside_the_nucleus(logits, tokens, temperature, expected) == 0
    p_value = _chi_square_p_value(counts, expected * rows)
    assert p_value > SIGNIFICANCE, (temperature, top_p, p_value)
    if (temperature, top_p) == (0.6, 0.95):  # the test tells a near miss apart
        for near in (_float_distribution(logits, 0.65, 0.95),
                     _float_distribution(logits, 0.6, 0.9)):
            assert _chi_square_p_value(counts, near * rows) < SIGNIFICANCE


def test_one_seed_over_positions_draws_from_the_same_distribution(session):
    """The position keys the draw: one seed over many positions samples like many seeds."""
    logits = _logits(3)
    rows = 6000
    (tokens,) = session.run(None, _feeds(logits, 0.8, 0.95, [12345] * rows, range(rows)))
    expected = _float_distribution(logits, 0.8, 0.95)
    p_value = _chi_square_p_value(np.bincount(tokens, minlength=VOCAB), expected * rows)
    assert p_value > SIGNIFICANCE, p_value


def test_temperature_zero_is_the_first_argmax_and_a_low_temperature_approaches_it(session):
    rng = np.random.default_rng(4)
    rows = 64
    logits = np.rint(rng.normal(0, 2.5, (rows, VOCAB)) / SCALE).astype(np.int32)
    logits[:8, 100] = logits[:8, 200] = logits[:8].max() + 5  # ties go to the first index
    feeds = {"logits": logits, "temperature": np.zeros((rows, 1), np.int64),
             "top_p": np.full((rows, 1), 950), "seed": rng.integers(0, 2**63, (rows, 1)),
             "positions": np.arange(rows).reshape(rows, 1)}
    (greedy,) = session.run(None, feeds)
    assert greedy.tolist() == logits.argmax(axis=1).tolist()
    assert set(greedy[:8].tolist()) == {100}
    # At the lowest temperature a lead of one nat is e**-20 to one: the argmax every time.
    lead = logits.copy()
    lead[np.arange(rows), greedy] = np.sort(logits, axis=1)[:, -2] + round(1 / SCALE)
    feeds.update(logits=lead, temperature=np.full((rows, 1), sampling.MIN_TEMPERATURE))
    (cold,) = session.run(None, feeds)
    assert cold.tolist() == greedy.tolist()


def test_a_draw_is_fixed_by_its_seed_and_position_on_any_thread_count(sampler, session):
    logits = _logits(5, lead=1.0)  # a flat row: draws spread over many tokens
    seeds = np.random.default_rng(6).integers(0, sampling.SEED_LIMIT, 200)
    feeds = _feeds(logits, 1.0, 1.0, seeds, range(200))
    (first,) = session.run(None, feeds)
    (again,) = _session(sampler, 1).run(None, feeds)
    assert first.tolist() == again.tolist()
    assert len(set(first.tolist())) > 100  # the seeds and positions do move the draw
    moved = _feeds(logits, 1.0, 1.0, seeds + 1, range(200))
    assert (session.run(None, moved)[0] != first).mean() > 0.9


def test_the_numpy_reference_computes_the_same_tokens(sampler, session):
    """Every op is the op set's: the reference (and so the one-step verifier's semantics)
    gives ONNX Runtime's tokens, at every temperature and top-p, including the edges."""
    rng = np.random.default_rng(7)
    rows = 12
    logits = np.rint(rng.normal(0, 3, (rows, VOCAB)) / SCALE).astype(np.int32)
    logits[0] = LOGIT_BOUND  # a flat row
    logits[1, :] = -LOGIT_BOUND
    logits[1, VOCAB - 1] = LOGIT_BOUND  # a certain last token
    feeds = {"logits": logits,
             "temperature": np.array([0, 50, 600, 2000] * 3).reshape(rows, 1),
             "top_p": np.array([1, 500, 950, 1000] * 3).reshape(rows, 1),
             "seed": rng.integers(0, sampling.SEED_LIMIT, (rows, 1)),
             "positions": rng.integers(0, 1 << 20, (rows, 1))}
    (tokens,) = session.run(None, feeds)
    assert reference.run_graph(sampler, feeds)["tokens"].tolist() == tokens.tolist()
    assert tokens[1] == VOCAB - 1


def test_the_sampler_stays_in_the_op_set_and_its_nodes_open_at_most_a_chunk(sampler):
    stats = manifest.graph_statistics(sampler, 4, {})
    assert stats["op_set_violations"] == [] and stats["float_tensors"] == 0
    shapes = manifest._static_shapes(sampler, 4)
    constants = {init.name: onnx.numpy_helper.to_array(init)
                 for init in sampler.graph.initializer}
    for node in sampler.graph.node:
        if node.name == "greedy":  # the test graph's own whole-row argmax
            continue
        fan_in = opset.OPS[node.op_type].fan_in_bytes(
            node, [shapes[n][0] for n in node.input],
            [onnx.helper.tensor_dtype_to_np_dtype(shapes[n][1]) for n in node.input],
            [constants.get(n) for n in node.input])
        assert fan_in <= sampling.SUM_CHUNK_BYTES, (node.name, fan_in)


def test_sampling_parameters_are_checked():
    assert Sampling.from_floats(0.6, 0.95, 7) == Sampling(600, 950, 7)
    assert Sampling().greedy and not Sampling(600).greedy
    for bad, message in ((dict(temperature=10), "temperature 0.01 is outside"),
                         (dict(temperature=2001), "temperature 2.001"),
                         (dict(top_p=0), "top-p 0 is outside"),
                         (dict(top_p=1001), "top-p 1.001"),
                         (dict(seed=-1), "seed -1"), (dict(seed=1 << 63), "seed")):
        with pytest.raises(UserError, match=message):
            Sampling(**bad)


# -- the sampler in the model's graphs (`qwen2_graph.build_graph(..., sampling=True)`) --------


@pytest.fixture(scope="module")
def qwen2(random_checkpoint, tmp_path_factory):
    """The random checkpoint's integer constants, and its greedy and sampling graphs."""
    from optinfer.models.converter import (
        calibrate,
        default_calibration,
        open_checkpoint,
        quantize,
    )
    from optinfer.models.float_reference import FloatReference
    from optinfer.models.qwen2_graph import build_graph

    checkpoint = open_checkpoint(random_checkpoint, tmp_path_factory.mktemp("scratch"))
    spec, reader = checkpoint.spec, checkpoint.reader
    stats = calibrate(FloatReference(reader, spec), default_calibration(spec))
    m = quantize(spec, reader, stats, TINY_CONTEXT)
    graphs = {(mode, draws): _session(build_graph(m, mode, sampling=draws).model(), 2)
              for mode in ("verify", "decode") for draws in (False, True)}
    return m, graphs


def _shape(m) -> SimpleNamespace:
    """What `batching.empty_cache` reads of a model."""
    return SimpleNamespace(num_layers=len(m.layers), num_kv_heads=m.num_kv_heads,
                           head_dim=m.head_dim)


def _decode(m, session, prompt: list[int], max_tokens: int, draw: Sampling) -> list[int]:
    """KV-cache decoding on a sampling decode graph (as `IntegerModel.generate`)."""
    from optinfer.models.batching import empty_cache

    past = empty_cache(_shape(m), session)
    names = [o.name for o in session.get_outputs()]
    params = {"temperature": np.array([[draw.temperature]]), "top_p": np.array([[draw.top_p]]),
              "seed": np.array([[draw.seed]])}
    feed, position, output = list(prompt), 0, []
    while len(output) < max_tokens:
        results = session.run(names, {
            "tokens": np.asarray(feed, np.int64),
            "positions": np.arange(position, position + len(feed), dtype=np.int64),
            **params, **past})
        for j in range(len(m.layers)):
            past[f"past_k.{j}"], past[f"past_v.{j}"] = results[1 + 2 * j], results[2 + 2 * j]
        output.append(int(results[0][-1]))
        position += len(feed)
        feed = [output[-1]]
    return output


def _teacher_forced(session, prompt: list[int], output: list[int], draw: Sampling) -> list[int]:
    sequence = [len(prompt), draw.temperature, draw.top_p, draw.seed, *prompt, *output[:-1]]
    return session.run(None, {"sequence": np.asarray(sequence, np.int64)})[0].tolist()


def test_a_sampled_answer_is_what_the_sampling_verify_graph_recomputes(qwen2):
    """The provider's KV-cache draws and the watchtower's teacher-forced pass agree token for
    token, for every seed; other seeds give other answers; temperature 0 is greedy."""
    m, graphs = qwen2
    prompt = [3, 17, 42, 5, 8]
    answers = set()
    for seed in range(6):
        draw = Sampling(800, 950, seed * 7919)
        output = _decode(m, graphs["decode", True], prompt, 16, draw)
        assert _teacher_forced(graphs["verify", True], prompt, output, draw) == output
        answers.add(tuple(output))
        moved = Sampling(800, 950, seed * 7919 + 1)
        assert _teacher_forced(graphs["verify", True], prompt, output, moved) != output
    assert len(answers) == 6
    greedy = _decode(m, graphs["decode", True], prompt, 16, Sampling())
    plain = [len(prompt), *prompt, *greedy[:-1]]  # the greedy graph's input: [P] ++ tokens
    assert graphs["verify", False].run(None, {"sequence": np.asarray(plain)})[0].tolist() \
        == greedy == _teacher_forced(graphs["verify", True], prompt, greedy, Sampling(0, 17, 99))


def test_the_batch_graph_of_a_sampling_model_draws_each_row_as_alone(qwen2):
    """`batched_decode_graph` keys each sequence's draw by its own position and parameters."""
    from optinfer.models.batching import batched_decode_graph, empty_cache
    from optinfer.models.qwen2_graph import build_graph

    m, graphs = qwen2
    batch = _session(batched_decode_graph(build_graph(m, "decode", sampling=True).model(),
                                          TINY_CONTEXT), 2)
    prompts = [[3, 17, 42, 5, 8], [9, 1, 4], [7, 7, 2, 30]]
    draws = [Sampling(800, 950, 11), Sampling(0), Sampling(1500, 900, 12)]
    alone = [_decode(m, graphs["decode", True], p, 1, d)[0]
             for p, d in zip(prompts, draws, strict=True)]
    tokens = [t for p in prompts for t in p]
    rows = np.cumsum([len(p) for p in prompts]) - 1
    (together, *_) = batch.run(None, {
        "tokens": np.asarray(tokens),
        "sequences": np.repeat(np.arange(3), [len(p) for p in prompts]),
        "positions": np.concatenate([np.arange(len(p)) for p in prompts]),
        "predict_rows": rows, "past_positions": np.zeros(0, np.int64),
        "past_sequences": np.zeros(0, np.int64),
        "temperature": np.array([[d.temperature] for d in draws]),
        "top_p": np.array([[d.top_p] for d in draws]), "seed": np.array([[d.seed] for d in draws]),
        **empty_cache(_shape(m), batch)})
    assert together.tolist() == alone


# -- a model converted with `--sampling`: runtime, batches and the CLI ------------------------


@pytest.fixture(scope="module")
def sampling_model(random_checkpoint, tmp_path_factory) -> IntegerModel:
    from optinfer.models.converter import convert

    out = tmp_path_factory.mktemp("sampling") / "model"
    manifest = convert(random_checkpoint, out, max_context=TINY_CONTEXT, sampling=True)
    assert manifest["sampling"] is True
    return IntegerModel(out)


PROMPT = [4, 8, 15, 16, 23, 42]


def test_a_sampling_model_verifies_its_own_draws_and_no_other_seed_s(sampling_model,
                                                                      random_model):
    m, greedy_only = sampling_model, IntegerModel(random_model)
    # Temperature 0 is the greedy model's answer (the same constants, other graphs).
    assert m.generate(PROMPT, 8) == greedy_only.generate(PROMPT, 8)
    draws = [Sampling(1000, 1000, seed) for seed in range(5)]
    outputs = [m.generate(PROMPT, 8, draw=draw) for draw in draws]
    assert len({tuple(o) for o in outputs}) > 1
    for output, draw in zip(outputs, draws, strict=True):
        assert m.verify(PROMPT, output, draw=draw).valid
    crossed = [m.verify(PROMPT, outputs[0], draw=draw).valid for draw in draws[1:]]
    assert not all(crossed)  # another seed does not vouch for this answer
    sequences = [m.sequence(PROMPT, o, d) for o, d in zip(outputs, draws, strict=True)]
    assert [p.tolist() for p in predict_many(m, sequences)] == outputs
    with pytest.raises(UserError, match="decodes greedily only"):
        greedy_only.generate(PROMPT, 8, draw=Sampling(600))


def test_draws_in_a_batch_equal_each_alone(sampling_model):
    m = sampling_model
    jobs = [(PROMPT[: 2 + i], 6 + i) for i in range(5)]
    draws = [Sampling(), Sampling(700, 950, 1), Sampling(1500, 900, 2), Sampling(700, 950, 1),
             Sampling(2000, 1000, 3)]
    batched = generate_batched(m, jobs, max_batch=3, stop_at_eos=False, draws=draws)
    alone = [m.generate(p, n, stop_at_eos=False, draw=d)
             for (p, n), d in zip(jobs, draws, strict=True)]
    assert batched == alone


def test_generate_and_verify_take_the_draw_on_the_command_line(sampling_model):
    from tests.test_cli import cli_json

    m = sampling_model
    text = " ".join(f"t{t}" for t in PROMPT)
    flags = ("--temperature", "1", "--top-p", "0.9", "--seed", "3")
    made = cli_json("generate", "--model", m.dir, "--prompt", text, "--max-tokens", "8", *flags)
    assert made["tokens"] == m.generate(PROMPT, 8, draw=Sampling(1000, 900, 3))
    claim = ("--model", m.dir, "--prompt-tokens", ",".join(map(str, PROMPT)),
             "--output-tokens", ",".join(map(str, made["tokens"])))
    assert cli_json("verify", *claim, *flags)["valid"] is True
    other = next(seed for seed in range(4, 40) if not m.verify(
        PROMPT, made["tokens"], draw=Sampling(1000, 900, seed)).valid)
    assert cli_json("verify", *claim, "--temperature", "1", "--top-p", "0.9", "--seed",
                    str(other))["valid"] is False
    # The dispute trace of a sampled claim: the same root on one thread and two, another
    # root for another seed (the seed is in leaf 0).
    roots = {threads: cli_json("trace", *claim, *flags, "--threads", threads)["state_root"]
             for threads in ("1", "2")}
    assert roots["1"] == roots["2"]
    assert cli_json("trace", *claim, "--temperature", "1", "--top-p", "0.9", "--seed",
                    str(other))["state_root"] != roots["1"]


@pytest.mark.parametrize("args, message", [
    (("--temperature", "0.6"), "decodes greedily only"),  # tiny-r1, converted greedy
    (("--temperature", "5"), "temperature 5 is outside"),
    (("--temperature", "0.6", "--top-p", "0"), "top-p 0 is outside"),
])
def test_a_draw_the_model_cannot_make_is_one_line_and_a_nonzero_exit(args, message):
    from tests.test_cli import cli

    proc = cli("generate", "--prompt", "1+1=", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sampling_model_is_registered_under_its_own_id_which_the_watchtower_holds(
        sampling_model, random_model):
    """The model id binds whether the graph samples (the layout of a dispute's leaf 0): the
    spec read from a sampling manifest says so, and the id the watchtower computes for the
    model it runs is that spec's."""
    from optinfer.challenger.watchtower import LocalModel
    from optinfer.contracts.registry import ModelSpec

    sampler = ModelSpec.from_manifest(sampling_model.dir / "manifest.json")
    greedy = ModelSpec.from_manifest(Path(random_model) / "manifest.json")
    assert sampler.sampling and not greedy.sampling
    assert sampler.node_count == sampling_model.manifest["nodes"]
    assert LocalModel(sampling_model.dir).held.model_id == sampler.model_id
    assert LocalModel(random_model).held.model_id == greedy.model_id


def test_the_generation_process_draws_each_job_with_its_own_parameters(sampling_model):
    """The provider's path: jobs with their draws, batched in the generation process, answer
    as each would alone."""
    from optinfer.models.generation import GenerationProcess

    m = sampling_model
    jobs = [(PROMPT[:3], 6, Sampling(900, 950, 21)), (PROMPT, 5), (PROMPT[:4], 7, None),
            (PROMPT[:5], 6, Sampling(1500, 1000, 22))]
    with GenerationProcess(m.dir, max_batch=3) as process:
        answers = list(process.stream(jobs))
    assert [a.error for a in answers] == [None] * 4
    assert [a.output for a in answers] == [
        m.generate(p, n, draw=rest[0] if rest else None) for p, n, *rest in jobs]


# -- disputes over sampled answers, played on the spec (`prover.game`) ------------------------


@pytest.fixture(scope="module")
def sampled_claim(sampling_model):
    """A sampled answer, the honest trace of the claim with one token substituted, and the
    one-step verifier of the model's roots."""
    from optinfer.prover.game import ModelTrace, TraceCommitment, one_step_verifier
    from optinfer.prover.one_step_prover import CommittedModel

    m, draw = sampling_model, Sampling(900, 950, 77)
    output = m.generate(PROMPT, 8, draw=draw, stop_at_eos=False)
    committed = CommittedModel(m)

    def trace(claimed: list[int]) -> ModelTrace:
        return ModelTrace(committed, TraceCommitment(*m.trace(PROMPT, claimed, draw)))

    honest = trace(output)
    verifier = one_step_verifier(committed.nodes_root, committed.constants_root)
    return m, output, trace, honest, verifier


def _dispute(liar, honest, verifier):
    from optinfer.prover.game import Role, max_rounds
    from tests.test_game import _honest, _largest_bytes, _setup, play

    bound = max_rounds(honest.node_count, _largest_bytes(honest, liar))
    return play(_setup(liar, honest), {Role.PROVIDER: _honest(liar, Role.PROVIDER),
                                       Role.CHALLENGER: _honest(honest, Role.CHALLENGER)},
                verifier, Role.CHALLENGER, honest, bound)


@pytest.mark.parametrize("position", [0, 3, 7])
def test_a_provider_substituting_a_sampled_token_loses_the_game(sampled_claim, position):
    """The claim's tokens are leaf 0 (the contract computes it from the claimed output), so
    the honest challenger traces the claim itself: every node agrees but the last, whose
    element at the substituted position the one-step recomputes from the agreed sampler."""
    from optinfer.prover.game import Role

    m, output, trace, _, verifier = sampled_claim
    claimed = list(output)
    claimed[position] = (claimed[position] + 1) % m.vocab_size
    honest = trace(claimed)  # the model's draws given the claimed tokens
    assert honest.tensor(honest.node_count)[position] != claimed[position]
    liar = honest.with_output(honest.node_count, np.asarray(claimed, np.int64))
    state = _dispute(liar, honest, verifier)
    assert state.winner is Role.CHALLENGER and "one-step" in state.reason
    assert state.k == honest.node_count


def test_a_provider_lying_inside_the_sampler_loses_the_game(sampled_claim):
    """A lie in the draw's word, the nucleus, the uniform value or the chosen chunk: the
    bisection lands on that node and its one-step convicts the provider."""
    from optinfer.prover.game import Role
    from tests.lies import changed

    m, _, _, honest, verifier = sampled_claim
    names = [node.output[0] for node in m.verify_graph().graph.node]
    for name in ("sample.rng", "sample.topp.5.mass", "sample.u", "sample.chunk.through"):
        k = names.index(name) + 1
        tensor = honest.tensor(k)
        state = _dispute(honest.with_output(k, changed(tensor, tensor.size - 1, 1)), honest,
                         verifier)
        assert state.winner is Role.CHALLENGER and state.k == k, name
