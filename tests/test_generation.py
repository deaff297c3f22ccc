"""models.generation: greedy generation in a child process answers exactly as in-process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from optinfer.errors import UserError
from optinfer.models.generation import (
    CpuSplit,
    GenerationError,
    GenerationProcess,
    generate_in_process,
    parse_cpu_list,
    split_cpus,
)
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR

PROMPTS = ["12+34=", "999+1=", "7+8="]


@pytest.fixture(scope="module")
def model() -> IntegerModel:
    return IntegerModel(INTEGER_DIR)


@pytest.fixture(scope="module")
def generator():
    with GenerationProcess(INTEGER_DIR) as process:
        yield process


def test_a_stream_answers_in_order_exactly_as_the_model_in_process(model, generator):
    jobs = [(model.encode(text), 24) for text in PROMPTS * 2]
    answers = list(generator.stream(jobs))
    assert [a.output for a in answers] == [model.generate(p, n) for p, n in jobs]
    assert all(a.error is None and a.seconds > 0 for a in answers)
    assert [a.output for a in generate_in_process(model, jobs)] == [a.output for a in answers]


def test_answers_come_back_as_they_are_done_a_short_one_before_a_long_one(model, generator):
    """Jobs decode together in the child (issue 21): a two-token answer sent after a long
    one is done, and handed back, first; each is what the model gives it alone."""
    long, short = (model.encode(PROMPTS[0]), 40), (model.encode(PROMPTS[2]), 2)
    done = list(generator.stream_as_done([long, short]))
    assert [index for index, _ in done] == [1, 0]
    assert [answer.output for _, answer in done] == [model.generate(*short),
                                                     model.generate(*long)]
    assert generator.max_batch == 8 and generator.queued_jobs == 9


@pytest.mark.parametrize("limits", [{"max_batch": 1}, {"kv_budget_bytes": 1}])
def test_past_the_batch_size_or_the_cache_budget_a_job_waits_its_turn(model, limits):
    """Admission control: with a batch of one, or a KV-cache budget too small for two
    sequences (a job alone always runs), the short job waits for the long one to finish."""
    long, short = (model.encode(PROMPTS[0]), 40), (model.encode(PROMPTS[2]), 2)
    with GenerationProcess(INTEGER_DIR, **limits) as limited:
        done = list(limited.stream_as_done([long, short]))
    assert [index for index, _ in done] == [0, 1]
    assert [answer.output for _, answer in done] == [model.generate(*long),
                                                     model.generate(*short)]


def test_a_batch_of_no_sequence_is_refused():
    with pytest.raises(UserError, match="batch size must be at least 1"):
        GenerationProcess(INTEGER_DIR, max_batch=0)


def test_a_refused_prompt_is_its_answer_s_error_and_the_stream_goes_on(model, generator):
    good = model.encode(PROMPTS[0])
    answers = list(generator.stream([(good, 8), ([model.vocab_size], 8), (good, 0), (good, 8)]))
    assert [type(a.error) for a in answers] == [type(None), UserError, UserError, type(None)]
    assert "vocabulary" in str(answers[1].error) and "max tokens" in str(answers[2].error)
    assert answers[0].output == answers[3].output == model.generate(good, 8)
    with pytest.raises(UserError, match="max tokens"):
        generator.generate(good, 0)


def test_an_abandoned_stream_leaves_nothing_for_the_next_one(model, generator):
    prompts = [model.encode(text) for text in PROMPTS]
    for answer in generator.stream([(p, 16) for p in prompts]):
        assert answer.output == model.generate(prompts[0], 16)
        break
    assert generator.generate(prompts[2], 16) == model.generate(prompts[2], 16)


def test_a_child_killed_under_a_request_is_reported_then_started_again(model):
    prompt = model.encode(PROMPTS[1])
    with GenerationProcess(INTEGER_DIR) as generator:
        first = generator._process

        def killed_once_the_stream_has_begun():
            # The stream has checked its child by now; the death lands between that check and
            # the request, where a provider under load would meet it.
            first.kill()
            first.wait()
            yield prompt, 8

        with pytest.raises(GenerationError, match=r"died \(exit code -9\)"):
            list(generator.stream(killed_once_the_stream_has_begun()))
        assert generator.generate(prompt, 8) == model.generate(prompt, 8)
        assert generator._process.pid != first.pid


def test_a_child_that_died_while_idle_is_started_again_without_an_error(model):
    prompt = model.encode(PROMPTS[1])
    with GenerationProcess(INTEGER_DIR) as generator:
        first = generator._process
        first.kill()
        first.wait()
        assert generator.generate(prompt, 8) == model.generate(prompt, 8)
        assert generator._process.pid != first.pid


def test_a_bad_model_directory_fails_at_start_with_the_model_s_message(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        GenerationProcess(tmp_path / "missing")


def test_the_child_ends_with_its_parent_even_after_sigkill(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from optinfer.models.generation import GenerationProcess
        generator = GenerationProcess({str(INTEGER_DIR)!r})
        print(generator._process.pid, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------ CPU pinning

FOUR = frozenset({0, 1, 2, 3})


def test_cpu_lists_read_as_the_kernel_writes_them():
    assert parse_cpu_list("3") == {3}
    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5}
    assert parse_cpu_list(" 1 , 3-3") == {1, 3}
    for bad in ("", "a", "1-", "-1", "1,,2", "2-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_auto_gives_the_generation_the_last_cpus_and_the_node_the_rest():
    assert split_cpus("auto", 1, FOUR) == CpuSplit(frozenset({3}), frozenset({0, 1, 2}))
    assert split_cpus("auto", 2, FOUR) == CpuSplit(frozenset({2, 3}), frozenset({0, 1}))
    assert split_cpus("auto", 1, frozenset({4, 9})) == CpuSplit(frozenset({9}),
                                                                frozenset({4}))
    # No CPU would be left to the node: nothing is pinned.
    assert split_cpus("auto", 4, FOUR) is None
    assert split_cpus("auto", 1, frozenset({0})) is None
    assert split_cpus("none", 1, FOUR) is None


def test_a_cpu_list_is_taken_as_given_and_refused_when_it_cannot_be():
    assert split_cpus("0,2", 2, FOUR) == CpuSplit(frozenset({0, 2}), frozenset({1, 3}))
    refusals = {
        "4": "CPU 4 is not available to this process (it may use 0,1,2,3)",
        "0-3": "leaves no CPU to the node",
        "3": "names 1 CPU(s) for 2 generation threads",
        "x": "is not auto, none, or a CPU list",
    }
    for choice, message in refusals.items():
        with pytest.raises(UserError, match=re.escape(message)):
            split_cpus(choice, 2, FOUR)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_a_pinned_child_runs_on_its_cpus_only_and_reports_its_scheduler_times(model):
    split = split_cpus("auto", 1)
    prompt = model.encode(PROMPTS[0])
    with GenerationProcess(INTEGER_DIR, cpus=split.generation) as generator:
        child = generator._process.pid
        assert os.sched_getaffinity(child) == split.generation
        before = generator.scheduler_times()
        assert generator.generate(prompt, 16) == model.generate(prompt, 16)
        after = generator.scheduler_times()
        assert after.on_cpu_s > before.on_cpu_s
        assert after.waiting_for_cpu_s >= before.waiting_for_cpu_s >= 0
        # A child started again is pinned again.
        generator._process.kill()
        generator._process.wait()
        assert generator.generate(prompt, 16) == model.generate(prompt, 16)
        assert generator._process.pid != child
        assert os.sched_getaffinity(generator._process.pid) == split.generation
    assert os.sched_getaffinity(0) != split.generation  # the parent is left as it was
    assert generator.scheduler_times() is None  # no child runs
