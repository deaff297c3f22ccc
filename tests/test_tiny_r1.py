"""tiny-r1: problem generator, char-level tokenizer, training smoke run, committed checkpoint."""

import json
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from optinfer.errors import UserError
from optinfer.models import tiny_r1
from optinfer.models.tiny_r1 import (
    BOS_ID,
    END_THINK_ID,
    EOS_ID,
    PAD_ID,
    THINK_ID,
    answer_from_completion,
    build_tokenizer,
    held_out_problems,
    is_held_out,
    make_problem,
    problem_for,
)

COMMITTED_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "tiny-r1" / "float"

STEP = re.compile(r"(\d)\+(\d)\+([01])=(\d)(\d)")


def _operands(prompt: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    assert match, f"malformed prompt {prompt!r}"
    return int(match.group(1)), int(match.group(2))


def _check_trace(prompt: str, completion: str) -> None:
    """Re-derive the sum from the trace alone, checking every column step against the prompt."""
    a, b = _operands(prompt)
    match = re.fullmatch(r"<think>(.*)</think>(\d+)", completion)
    assert match, f"malformed completion {completion!r}"
    steps = match.group(1).split(" ")
    assert len(steps) == max(len(str(a)), len(str(b)))
    carry = 0
    answer_digits = []
    for column, step in enumerate(steps):
        parsed = STEP.fullmatch(step)
        assert parsed, f"malformed step {step!r}"
        digit_a, digit_b, carry_in, carry_out, digit = map(int, parsed.groups())
        assert digit_a == a // 10**column % 10
        assert digit_b == b // 10**column % 10
        assert carry_in == carry
        assert 10 * carry_out + digit == digit_a + digit_b + carry_in
        answer_digits.append(str(digit))
        carry = carry_out
    from_trace = int(("1" if carry else "") + "".join(reversed(answer_digits)))
    assert from_trace == int(match.group(2)) == a + b


def test_problem_for_matches_the_documented_example():
    problem = problem_for(357, 68)
    assert problem.prompt == "357+68="
    assert problem.completion == "<think>7+8+0=15 5+6+1=12 3+0+1=04</think>425"
    assert problem.answer == 425


def test_problem_for_final_carry_becomes_leading_one():
    assert problem_for(999, 1).completion == ("<think>9+1+0=10 9+0+1=10 9+0+1=10</think>1000")
    assert problem_for(0, 0).completion == "<think>0+0+0=00</think>0"


def test_make_problem_is_deterministic_in_the_rng():
    first = [make_problem(random.Random(7)) for _ in range(3)]
    rng_a, rng_b = random.Random(11), random.Random(11)
    assert [make_problem(rng_a) for _ in range(50)] == [make_problem(rng_b) for _ in range(50)]
    assert first[0] == first[1] == first[2]


def test_make_problem_traces_are_correct_arithmetic():
    rng = random.Random(0)
    for _ in range(500):
        problem = make_problem(rng)
        _check_trace(problem.prompt, problem.completion)
        assert answer_from_completion(problem.completion) == problem.answer


def test_operand_lengths_are_balanced():
    rng = random.Random(1)
    lengths = [len(str(_operands(make_problem(rng).prompt)[0])) for _ in range(3000)]
    for digits in (1, 2, 3):
        assert 800 < lengths.count(digits) < 1200


def test_held_out_problems_are_disjoint_from_training_and_deterministic():
    held_out = held_out_problems(300, seed=0)
    assert held_out == held_out_problems(300, seed=0)
    assert held_out[:100] == held_out_problems(100, seed=0)
    assert held_out != held_out_problems(300, seed=1)
    assert len({p.prompt for p in held_out}) == 300
    assert all(is_held_out(*_operands(p.prompt)) for p in held_out)
    for problem in held_out:
        _check_trace(problem.prompt, problem.completion)
    rng = random.Random(2)
    training_prompts = {make_problem(rng).prompt for _ in range(5000)}
    assert training_prompts.isdisjoint(p.prompt for p in held_out)
    assert not any(is_held_out(*_operands(p)) for p in training_prompts)


def test_held_out_fraction_is_about_five_percent():
    held = sum(is_held_out(a, b) for a in range(200) for b in range(200))
    assert 0.04 < held / 200**2 < 0.062


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>7+8+0=15</think>15<eos>", 15),
        ("<think>7+8+0=15</think>15", 15),
        ("<think>1+1+0=02</think>2<eos><eos>", 2),
        ("<think>7+8+0=15", None),
        ("<think>7+8+0=15</think><eos>", None),
        ("", None),
    ],
)
def test_answer_from_completion(text, expected):
    assert answer_from_completion(text) == expected


def test_tokenizer_is_char_level_with_bos_and_single_think_tokens(tmp_path):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == len(tiny_r1.VOCABULARY) < 30
    encoded = tokenizer.encode("357+68=")
    assert encoded.tokens == ["<bos>", "3", "5", "7", "+", "6", "8", "="]
    assert encoded.ids[0] == BOS_ID
    completion = tokenizer.encode("<think>7+8+0=15 5</think>42", add_special_tokens=False)
    assert completion.ids[0] == THINK_ID
    assert completion.ids.count(END_THINK_ID) == 1
    assert len(completion.ids) == 1 + len("7+8+0=15 5") + 1 + 2
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<eos>")] == [PAD_ID, EOS_ID]


def test_tokenizer_decode_round_trips_without_inserting_spaces():
    tokenizer = build_tokenizer()
    rng = random.Random(3)
    for _ in range(50):
        problem = make_problem(rng)
        text = problem.prompt + problem.completion
        ids = tokenizer.encode(text).ids + [EOS_ID]
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text + "<eos>"
        # Like DeepSeek-R1's, the think markers are not "special": they survive skipping.
        assert tokenizer.decode(ids) == text


def test_encode_prompt_rejects_characters_outside_the_vocabulary():
    with pytest.raises(UserError, match="only"):
        tiny_r1.encode_prompt(build_tokenizer(), "3*4=")


SMOKE_RUN = {"minutes": 1.0, "steps": 4, "batch_size": 8, "eval_problems": 1}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A 4-step training run of seed 0: (metrics, progress fractions, checkpoint dir)."""
    checkpoint = tmp_path_factory.mktemp("smoke") / "ckpt"
    fractions = []
    metrics = tiny_r1.train_tiny(
        checkpoint, seed=0, progress=lambda fraction, _: fractions.append(fraction), **SMOKE_RUN
    )
    return metrics, fractions, checkpoint


def test_train_tiny_smoke_writes_loadable_checkpoint(smoke_run):
    metrics, fractions, checkpoint = smoke_run
    assert metrics["steps"] == metrics["planned_steps"] == 4
    assert not metrics["clock_driven"]
    assert metrics["final_loss"] > 0
    assert metrics["eval"]["problems"] == 1
    assert fractions[-1] == 1.0
    assert fractions == sorted(fractions)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (checkpoint / name).is_file(), name
    model = Qwen2ForCausalLM.from_pretrained(checkpoint)
    assert model.config.num_key_value_heads == 2
    assert not model.config.tie_word_embeddings
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["rope_theta"] == 10000.0
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )


def test_train_tiny_is_deterministic_in_the_seed(smoke_run, tmp_path):
    _, _, checkpoint = smoke_run
    tiny_r1.train_tiny(tmp_path / "same", seed=0, **SMOKE_RUN)
    tiny_r1.train_tiny(tmp_path / "other", seed=1, **SMOKE_RUN)
    weights = (checkpoint / "model.safetensors").read_bytes()
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != weights


def test_committed_checkpoint_layout():
    config = json.loads((COMMITTED_CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["dtype"] == "bfloat16"
    assert config["vocab_size"] == len(tiny_r1.VOCABULARY)
    assert (COMMITTED_CHECKPOINT / "model.safetensors").stat().st_size < 4_000_000
    committed = Tokenizer.from_file(str(COMMITTED_CHECKPOINT / "tokenizer.json"))
    assert committed.to_str() == build_tokenizer().to_str()


def test_committed_tokenizer_loads_in_transformers_with_its_roles():
    tokenizer = PreTrainedTokenizerFast.from_pretrained(COMMITTED_CHECKPOINT)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    problem = problem_for(357, 68)
    text = problem.prompt + problem.completion
    ids = tokenizer(text).input_ids
    assert ids == build_tokenizer().encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_committed_checkpoint_solves_held_out_problems():
    scores = tiny_r1.evaluate(
        tiny_r1.float_generate_fn(COMMITTED_CHECKPOINT), held_out_problems(50, seed=0)
    )
    assert scores["problems"] == 50
    assert scores["accuracy"] >= 0.9, scores["failures"]
