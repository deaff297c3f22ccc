"""Continuous batching (issue 21): a sequence's tokens are the same alone and in any batch,
on every graph variant the converter writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from optinfer.errors import UserError
from optinfer.models import batching, qwen2_graph
from optinfer.models.batching import (
    DecodeBatch,
    batched_decode_graph,
    generate_batched,
    predict_many,
)
from optinfer.models.converter import convert
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR

from .conftest import TINY_CONTEXT
from .test_cli import cli

pytestmark = pytest.mark.xdist_group("batching")

TINY_R1_PROMPTS = ["12+34=", "5+7=", "23+19=", "40+2=", "99+1=", "7+8=", "63+28=", "1+1="]


@pytest.fixture(scope="module", params=["tiny-r1", "random", "linear16", "fine"])
def model(request, random_checkpoint, random_model, tmp_path_factory) -> IntegerModel:
    """The committed tiny-r1, and a random checkpoint's 8-bit, 16-bit-input and fine
    conversions."""
    if request.param == "tiny-r1":
        return IntegerModel(INTEGER_DIR)
    if request.param == "random":
        return IntegerModel(random_model)
    out = tmp_path_factory.mktemp(request.param) / "model"
    with pytest.MonkeyPatch.context() as patch:
        # A small lm_head block, so that the fine graph's blockwise logits are exercised.
        patch.setattr(qwen2_graph, "FINE_LOGIT_BLOCK", 64)
        convert(random_checkpoint, out, max_context=TINY_CONTEXT, linear_input_bits=16,
                weight_bits=13 if request.param == "fine" else 7)
    return IntegerModel(out)


def prompts_for(model: IntegerModel, count: int, seed: int) -> list[list[int]]:
    """Prompts of mixed lengths: tiny-r1's own problems, or random tokens."""
    if model.dir == INTEGER_DIR:
        return [model.encode(TINY_R1_PROMPTS[i % len(TINY_R1_PROMPTS)]) for i in range(count)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.vocab_size, int(rng.integers(1, 24))).tolist()
            for _ in range(count)]


def test_a_sequence_is_the_same_alone_and_in_batches_of_every_size(model):
    """Each job's tokens from batches of 1, 2, 3 and all of them (a job joining whenever
    another leaves) equal its generation alone, which the committed verify graph accepts."""
    prompts = prompts_for(model, 7, seed=1)
    jobs = [(prompt, 12 + 5 * (i % 3)) for i, prompt in enumerate(prompts)]
    alone = [model.generate(prompt, max_tokens) for prompt, max_tokens in jobs]
    for max_batch in (1, 2, 3, len(jobs)):
        assert generate_batched(model, jobs, max_batch) == alone, max_batch
    for (prompt, max_tokens), output in zip(jobs, alone, strict=True):
        assert model.verify(prompt, output, max_tokens).valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequences_joining_and_leaving_at_random_steps_change_nobody_s_tokens(model, seed):
    """A random schedule: sequences of random prompts and lengths join at random steps
    (several at once, or none), some stop at EOS and some run to their max tokens, and leave
    as they finish. Every token each one got, step by step, is its token alone."""
    rng = np.random.default_rng(100 + seed)
    prompts = prompts_for(model, 10, seed=200 + seed)
    jobs = []
    for prompt in prompts:
        max_tokens = int(rng.integers(1, min(30, model.max_context - len(prompt) + 1) + 1))
        jobs.append((prompt, max_tokens, bool(rng.integers(0, 2))))
    batch, waiting, streams, sizes = DecodeBatch(model), list(enumerate(jobs)), {}, []
    while waiting or len(batch):
        for _ in range(int(rng.integers(0, 3)) if len(batch) else 1):
            if waiting:
                index, (prompt, max_tokens, stop_at_eos) = waiting.pop(0)
                batch.add(index, prompt, max_tokens, stop_at_eos)
                streams[index] = []
        sizes.append(len(batch))
        for step in batch.step():
            streams[step.sequence].append(step.token)
            if step.done:
                assert batch.take(step.sequence) == streams[step.sequence]
        # The cache holds the running sequences' tokens so far, nobody else's.
        assert batch.cached_keys == sum(
            len(jobs[i][0]) + len(streams[i]) - 1 for i in streams if i in batch)
    assert max(sizes) >= 3  # the schedule did batch
    for index, (prompt, max_tokens, stop_at_eos) in enumerate(jobs):
        assert streams[index] == model.generate(prompt, max_tokens, stop_at_eos=stop_at_eos)


def test_claims_verified_in_one_shared_pass_get_the_verify_graph_s_predictions(model):
    """`predict_many`: each claim's teacher-forced tokens, true or false (random outputs),
    equal the committed verify graph's for that claim alone, whatever the claims share."""
    rng = np.random.default_rng(5)
    sequences = []
    for prompt in prompts_for(model, 9, seed=6):
        honest = model.generate(prompt, 10)
        forged = rng.integers(0, model.vocab_size, int(rng.integers(1, 12))).tolist()
        for output in (honest, forged):
            sequences.append(model.sequence(prompt, output))
    alone = [model.predict_sequence(sequence) for sequence in sequences]
    # Every claim in one pass, passes of the default size, and a pass each.
    for rows_per_pass in (10_000, batching.ROWS_PER_PASS, 1):
        shared = predict_many(model, sequences, rows_per_pass)
        assert [p.tolist() for p in shared] == [p.tolist() for p in alone], rows_per_pass
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batching, "MAX_PASS_SCORES", 1)  # the memory bound splits them too
        assert [p.tolist() for p in predict_many(model, sequences, 10_000)] == [
            p.tolist() for p in alone]


def test_the_batch_graph_is_derived_from_the_decode_graph_and_refuses_others():
    m = IntegerModel(INTEGER_DIR)
    decode = onnx.load(str(INTEGER_DIR / "decode.onnx"), load_external_data=False)
    batched = batched_decode_graph(decode, m.max_context)
    inputs = [i.name for i in batched.graph.input]
    assert inputs[:2] == ["tokens", "positions"]
    assert {"sequences", "predict_rows", "past_positions", "past_sequences"} <= set(inputs)
    assert [o.name for o in batched.graph.output] == [o.name for o in decode.graph.output]
    # The single-sequence key count is gone with the Range it fed.
    assert "Range" not in {node.op_type for node in batched.graph.node}
    verify = m.verify_graph()
    with pytest.raises(ValueError, match="not a decode graph"):
        batched_decode_graph(verify, m.max_context)


def test_what_a_batch_refuses():
    m = IntegerModel(INTEGER_DIR)
    batch = DecodeBatch(m)
    with pytest.raises(UserError, match="empty"):
        batch.add(1, [], 4)
    with pytest.raises(UserError, match="outside the vocabulary"):
        batch.add(1, [m.vocab_size], 4)
    with pytest.raises(UserError, match="exceed the model's context"):
        batch.add(1, [1] * m.max_context, 2)
    with pytest.raises(UserError, match="max tokens"):
        batch.add(1, [1, 2], 0)
    batch.add(1, [1, 2], 3)
    with pytest.raises(ValueError, match="already running"):
        batch.add(1, [3], 3)
    with pytest.raises(UserError, match="batch size"):
        generate_batched(m, [([1], 1)], 0)
    assert batch.step()[0].sequence == 1 and len(batch) == 1


def test_bench_throughput_reports_every_level_and_no_mismatch(tmp_path):
    """`optinfer bench throughput` on tiny-r1: the issue's keys, one figure per level, every
    batched answer equal to the single-request path's (no speed is asserted here: figures
    live in docs/performance.md)."""
    proc = cli("bench", "throughput", "--model", INTEGER_DIR, "--concurrency", "8,1",
               "--tokens", "6")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["concurrency"] == [1, 8]
    assert set(result["throughput"]) == set(result["ttft_p50_s"]) == {"1", "8"}
    assert all(value > 0 for value in result["throughput"].values())
    assert result["ttft_p50_s"]["8"] <= result["ttft_p95_s"]["8"]
    assert result["batch_invariance_mismatches"] == 0
    assert result["speedup_at_8"] > 0 and result["peak_rss_bytes"] > 0
    assert result["tokens_per_request"] == 6 and result["threads"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrency", "0,4"], "--concurrency must list levels of at least 1"),
    (["--concurrency", "four"], "--concurrency must be comma-separated integers"),
    (["--tokens", "1"], "--tokens must be at least 2"),
    (["--tokens", "500"], "leaves no room for a prompt"),
])
def test_bench_throughput_refuses_bad_options_in_one_line(args, message):
    proc = cli("bench", "throughput", "--model", INTEGER_DIR, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_throughput_refuses_a_directory_without_a_model(tmp_path):
    proc = cli("bench", "throughput", "--model", tmp_path)
    assert proc.returncode == 2 and "is not a converted model" in proc.stderr
