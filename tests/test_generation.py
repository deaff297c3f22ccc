"""models.generation: greedy generation in a child process answers exactly as in-process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from optinfer.errors import UserError
from optinfer.models.generation import GenerationError, GenerationProcess, generate_in_process
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
