"""tiny-r1: a small Qwen2-architecture model that adds numbers after a `<think>` trace.

The project's stand-in for DeepSeek-R1-Distill: same architecture family (Qwen2, GQA, untied
embeddings, q/k/v biases, bf16 weights), a Hugging Face checkpoint directory with a
`tokenizer.json`, but small enough to train on two CPU cores in minutes and to run through the
integer converter in tests.

Task format (one problem)::

    prompt      "357+68="
    completion  "<think>7+8+0=15 5+6+1=12 3+0+1=04</think>425" then EOS

The trace works column by column from the least significant digit. Every step has the same
shape, `a+b+c=cs`: the column's digit of each operand (0 where an operand has run out of
digits), the carry coming in, then the two-digit column sum whose first digit is the carry out
and whose second is the answer digit. Fixed-width steps keep every step at a fixed offset from
`<think>`, which is what lets a four-layer model learn to find "the digit of this column" and
later "the answer digit of step k" by relative position alone. The number of steps equals the
digit count of the longer operand; a final carry shows as the answer's leading 1.

Public entry points: `make_problem`, `held_out_problems`, `answer_from_completion` (data);
`build_tokenizer` (tokenizer); `tiny_config` (model shape); `train_tiny` (training, writes the
checkpoint); `evaluate` and `float_generate_fn` (scoring any greedy generator). torch and
transformers are imported by the functions that train or run the float model, so the task, the
tokenizer and the committed model's paths serve nodes installed without them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from optinfer.errors import UserError

if TYPE_CHECKING:  # training and the float model only: nodes import this module without them
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

TINY_R1_DIR = Path(__file__).resolve().parent / "tiny-r1"
FLOAT_DIR = TINY_R1_DIR / "float"  # the committed float checkpoint
INTEGER_DIR = TINY_R1_DIR / "integer"  # its committed integer conversion
SAMPLING_DIR = TINY_R1_DIR / "integer-sampling"  # its committed conversion with --sampling
CALIBRATION_FILE = TINY_R1_DIR / "calibration.txt"  # what the conversion was calibrated on

# --------------------------------------------------------------------------------------------
# Synthetic problems
# --------------------------------------------------------------------------------------------

MAX_OPERAND_DIGITS = 3
"""Operands have 1..3 digits, so problems range from `0+0=` to `999+999=`."""

HELD_OUT_PER_256 = 13
"""About 5% of all (a, b) pairs (13/256) are held out: never trained on, used for evaluation."""


class Problem(NamedTuple):
    """One addition problem: `prompt` is what the model sees, `completion` what it must write
    (trace and answer, without EOS), `answer` the true sum."""

    prompt: str
    completion: str
    answer: int


def thinking_trace(a: int, b: int) -> str:
    """The `<think>...</think>` part of the completion for `a+b` (see the module docstring)."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    columns = max(len(str(a)), len(str(b)))
    steps = []
    carry = 0
    for column in range(columns):
        digit_a = a // 10**column % 10
        digit_b = b // 10**column % 10
        column_sum = digit_a + digit_b + carry
        steps.append(f"{digit_a}+{digit_b}+{carry}={column_sum:02d}")
        carry = column_sum // 10
    return "<think>" + " ".join(steps) + "</think>"


def problem_for(a: int, b: int) -> Problem:
    """The problem `a+b=` with its full completion."""
    return Problem(prompt=f"{a}+{b}=", completion=thinking_trace(a, b) + str(a + b), answer=a + b)


def is_held_out(a: int, b: int) -> bool:
    """Whether `a+b` belongs to the held-out split.

    The split is a fixed pseudo-random function of the pair (a hash, not a property of the
    digits), so held-out problems look like training problems but are never seen in training.
    """
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest()
    return digest[0] < HELD_OUT_PER_256


def _random_operand(rng: random.Random) -> int:
    """A number whose digit count is uniform over 1..MAX_OPERAND_DIGITS, then uniform within
    that count (a uniform draw over 0..999 would make nine in ten operands three-digit)."""
    digits = rng.randint(1, MAX_OPERAND_DIGITS)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_problem(rng: random.Random) -> Problem:
    """A random training problem (never one from the held-out split), drawn from `rng` only."""
    while True:
        a, b = _random_operand(rng), _random_operand(rng)
        if not is_held_out(a, b):
            return problem_for(a, b)


def held_out_problems(n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct held-out problems, drawn with the same operand distribution as training.

    Deterministic in (n, seed); a larger n with the same seed extends the smaller list.
    """
    rng = random.Random(f"held-out/{seed}")
    seen: set[tuple[int, int]] = set()
    problems = []
    while len(problems) < n:
        a, b = _random_operand(rng), _random_operand(rng)
        if is_held_out(a, b) and (a, b) not in seen:
            seen.add((a, b))
            problems.append(problem_for(a, b))
    return problems


_ANSWER_AFTER_TRACE = re.compile(r"</think>(\d+)")


def answer_from_completion(text: str) -> int | None:
    """The number written right after the first `</think>` in a completion, or None.

    `text` is decoded completion text, with or without special tokens (a trailing `<eos>`
    ends the digits). Digits that run on past the answer are part of it (so they make it wrong).
    """
    match = _ANSWER_AFTER_TRACE.search(text)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# Tokenizer: one token per character, plus special tokens
# --------------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
THINK_TOKEN, END_THINK_TOKEN = "<think>", "</think>"
CHARACTERS = "0123456789+= "
VOCABULARY = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, THINK_TOKEN, END_THINK_TOKEN, *CHARACTERS]
PAD_ID, BOS_ID, EOS_ID, THINK_ID, END_THINK_ID = range(5)


def build_tokenizer() -> Tokenizer:
    """The char-level tokenizer: each character of CHARACTERS is one token, `<think>` and
    `</think>` are single tokens, `encode` prepends BOS, `decode` concatenates without spaces.

    As in DeepSeek-R1-Distill, `<think>`/`</think>` are added tokens that are not "special", so
    `decode(..., skip_special_tokens=True)` keeps them while dropping BOS/EOS/PAD. A character
    outside the vocabulary makes `encode` raise (there is no unknown token).
    """
    tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCABULARY)}))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (THINK_TOKEN, END_THINK_TOKEN)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    # Without a decoder, `decode` joins tokens with spaces; Fuse concatenates them.
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt`, BOS first. UserError if it has characters outside the vocabulary."""
    unknown = sorted(set(prompt) - set(CHARACTERS))
    if unknown:
        raise UserError(f"tiny-r1 prompts use only {CHARACTERS!r}; got {''.join(unknown)!r}")
    return tokenizer.encode(prompt).ids


def encode_completion(tokenizer: Tokenizer, completion: str) -> list[int]:
    """Token ids of `completion` followed by EOS (no BOS): the targets the model is trained on."""
    return tokenizer.encode(completion, add_special_tokens=False).ids + [EOS_ID]


def _write_tokenizer_files(tokenizer: Tokenizer, out_dir: Path) -> None:
    """`tokenizer.json`, plus the `tokenizer_config.json` that gives transformers'
    `PreTrainedTokenizerFast.from_pretrained(dir)` the BOS/EOS/PAD roles.

    Not `AutoTokenizer`: transformers 5 maps model_type qwen2 to its byte-level Qwen2Tokenizer
    and rebuilds that pipeline around our vocabulary, which drops spaces.
    """
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "model_max_length": MAX_POSITIONS,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

MAX_POSITIONS = 128
"""Longest sequence the model is configured for; the longest problem (BOS, 3+3 digits, trace,
4-digit answer, EOS) takes 42 tokens."""


def tiny_config() -> Qwen2Config:
    """tiny-r1's shape: DeepSeek-R1-Distill's architecture choices at a small size.

    GQA with 4 query heads sharing 2 KV heads of dim 32, hidden 128, 4 layers, SwiGLU width 512,
    untied embeddings, q/k/v biases (Qwen2 always has them), RoPE theta 10000, RMSNorm eps 1e-6.
    """
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(VOCABULARY),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="bfloat16",
    )


def _save_checkpoint(model: Qwen2ForCausalLM, tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write `model` as a Hugging Face checkpoint dir with bf16 safetensors and the tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    # Copy so that the caller's fp32 model is not rounded in place.
    bf16_model = Qwen2ForCausalLM(model.config).to(torch.bfloat16)
    bf16_model.load_state_dict(model.state_dict())
    bf16_model.generation_config.do_sample = False
    bf16_model.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 writes `rope_parameters`; DeepSeek's config.json has a top-level
    # `rope_theta`. Write both so the dir reads like the real checkpoint to any parser.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_tokenizer_files(tokenizer, out_dir)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

DEFAULT_STEPS = 600
BATCH_SIZE = 64
PEAK_LEARNING_RATE = 3e-3
WARMUP_STEPS = 100
FINAL_LR_FRACTION = 0.05
WEIGHT_DECAY = 0.1
EVAL_PROBLEMS = 200

Progress = Callable[[float, str], None]


def _learning_rate(step: int, fraction_done: float, warmup_fraction: float) -> float:
    """Linear warmup to the peak over the first WARMUP_STEPS steps, then cosine decay to
    FINAL_LR_FRACTION of the peak as `fraction_done` goes from `warmup_fraction` to 1."""
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    decay_progress = (fraction_done - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, decay_progress))))
    return PEAK_LEARNING_RATE * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def _training_batch(
    rng: random.Random, tokenizer: Tokenizer, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, loss mask), both (batch, T): prompt ++ completion ++ EOS, right-padded.

    mask[i, t] is 1 where token t of row i is a completion token (EOS included), i.e. where the
    prediction made at position t-1 is scored. Right padding needs no attention mask: under the
    causal mask, real tokens never attend to the pads that follow them.
    """
    import torch

    rows, masks = [], []
    for _ in range(batch_size):
        problem = make_problem(rng)
        prompt_ids = encode_prompt(tokenizer, problem.prompt)
        completion_ids = encode_completion(tokenizer, problem.completion)
        rows.append(prompt_ids + completion_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
    length = max(len(row) for row in rows)
    ids = torch.full((batch_size, length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((batch_size, length), dtype=torch.float32)
    for i, (row, row_mask) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = torch.tensor(row_mask, dtype=torch.float32)
    return ids, mask


def _completion_loss(
    model: Qwen2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of the next-token predictions, over completion tokens only."""
    import torch

    logits = model(input_ids=ids).logits  # (B, T, V) fp32
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )  # (B * (T-1),)
    target_mask = mask[:, 1:].reshape(-1)
    return (per_token * target_mask).sum() / target_mask.sum()


def train_tiny(
    out_dir: Path,
    minutes: float = 8.0,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = BATCH_SIZE,
    eval_problems: int = EVAL_PROBLEMS,
) -> dict:
    """Train tiny-r1 from scratch on CPU and write the checkpoint dir `out_dir`.

    Runs `steps` AdamW steps (linear warmup, then cosine decay) on fresh batches of training
    problems, with the loss on completion tokens only, on 2 CPU threads.

    `minutes` is a wall-clock budget for the training loop. The cosine decay follows the
    larger of two fractions, steps done / `steps` and time spent / budget, and training ends
    when that reaches 1: on a fast machine after `steps` steps, on a slow one when the budget is
    spent, with the learning rate fully decayed either way. Saving and the held-out evaluation
    come after the budget (seconds on an idle machine).

    Deterministic: the same seed, steps and batch size give bit-identical weights, provided
    the clock never drove the schedule (`clock_driven` False in the result; true only when the
    machine was too slow to do `steps` steps in the budget at an even pace).

    The checkpoint (config.json, model.safetensors in bf16, generation_config.json,
    tokenizer.json, tokenizer_config.json) is written, then reloaded to score `eval_problems`
    held-out problems (`held_out_problems(eval_problems, seed=0)`), so the accuracy reported
    is that of the saved bf16 weights.

    `progress(fraction, message)`, if given, is called as training advances; fraction rises
    from 0 to 1.0, which is sent once everything is done.

    Returns {"steps": steps run, "planned_steps": `steps`, "clock_driven": bool,
    "final_loss": mean loss of the last 50 steps, "train_seconds": training loop wall time,
    "eval": evaluate()'s dict, "parameters": parameter count}.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    rng = random.Random(f"train/{seed}")
    tokenizer = build_tokenizer()

    model = Qwen2ForCausalLM(tiny_config()).to(torch.float32)
    model.train()
    # Decay only matrices; biases, norm gains are left alone (the usual AdamW convention).
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    not_decayed = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": WEIGHT_DECAY},
            {"params": not_decayed, "weight_decay": 0.0},
        ],
        lr=PEAK_LEARNING_RATE,
        betas=(0.9, 0.98),
    )

    budget_seconds = minutes * 60.0
    warmup_fraction = min(1.0, WARMUP_STEPS / steps)
    started = time.monotonic()
    recent_losses: list[float] = []
    clock_driven = False
    step = 0
    while True:
        # How far along the schedule is: by steps, or by the clock if that is further, so the
        # learning rate has fully decayed when the budget runs out on a slow (shared) machine.
        # Both terms only grow, so the learning rate never rises after warmup.
        time_fraction = (time.monotonic() - started) / budget_seconds
        fraction_done = max(step / steps, time_fraction)
        if fraction_done >= 1.0:
            break
        if step >= WARMUP_STEPS and time_fraction > step / steps:
            clock_driven = True
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, fraction_done, warmup_fraction)
        ids, mask = _training_batch(rng, tokenizer, batch_size)
        loss = _completion_loss(model, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        recent_losses = (recent_losses + [loss.item()])[-50:]
        if progress is not None and step % 10 == 0:
            fraction = max(step / steps, time_fraction)
            progress(0.9 * fraction, f"step {step}/{steps} loss {recent_losses[-1]:.4f}")
    train_seconds = time.monotonic() - started

    if progress is not None:
        progress(0.9, "saving checkpoint")
    _save_checkpoint(model, tokenizer, out_dir)
    if progress is not None:
        progress(0.92, f"evaluating on {eval_problems} held-out problems")
    scores = evaluate(float_generate_fn(out_dir), held_out_problems(eval_problems, seed=0))
    if progress is not None:
        progress(1.0, f"held-out accuracy {scores['accuracy']:.3f}")
    return {
        "steps": step,
        "planned_steps": steps,
        "clock_driven": clock_driven,
        "final_loss": sum(recent_losses) / max(1, len(recent_losses)),
        "train_seconds": train_seconds,
        "eval": scores,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

GenerateFn = Callable[[list[int], int], list[int]]
"""generate_fn(prompt_ids, max_new_tokens) -> new token ids: greedy decoding of up to
max_new_tokens tokens after prompt_ids (which start with BOS), stopping after the first EOS,
which is included. The prompt is not repeated in the result."""

MAX_NEW_TOKENS = 48
"""Enough for the longest completion (34 tokens with EOS) plus room to see a runaway."""


def evaluate(
    generate_fn: GenerateFn, problems: list[Problem], tokenizer: Tokenizer | None = None
) -> dict:
    """Score a greedy generator on `problems`.

    Returns {"problems": n, "correct": answers right, "accuracy": correct / n,
    "exact": completions equal to the reference trace and answer followed by EOS,
    "exact_fraction": exact / n, "failures": up to 5 (prompt, decoded completion) pairs}.
    """
    tokenizer = tokenizer or build_tokenizer()
    correct = exact = 0
    failures: list[tuple[str, str]] = []
    for problem in problems:
        new_ids = generate_fn(encode_prompt(tokenizer, problem.prompt), MAX_NEW_TOKENS)
        text = tokenizer.decode(new_ids, skip_special_tokens=False)
        if answer_from_completion(text) == problem.answer:
            correct += 1
        elif len(failures) < 5:
            failures.append((problem.prompt, text))
        if text == problem.completion + EOS_TOKEN:
            exact += 1
    n = len(problems)
    return {
        "problems": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "exact": exact,
        "exact_fraction": exact / n if n else 0.0,
        "failures": failures,
    }


def float_generate_fn(checkpoint_dir: Path) -> GenerateFn:
    """A GenerateFn running the float checkpoint in `checkpoint_dir` with a greedy loop.

    The stored weights (bf16) are upcast to fp32 and all arithmetic is fp32: this is the float
    reference the integer model is compared against. Each token re-runs the whole sequence
    without a KV cache, as the integer model's teacher-forced verification does; at tiny-r1's
    length (at most 42 tokens) that costs little. Ties in argmax go to the lowest id.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    model.eval()

    @torch.inference_mode()
    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits  # (1, T, V)
            next_id = int(logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == EOS_ID:
                break
        return ids[len(prompt_ids) :]

    return generate


# --------------------------------------------------------------------------------------------
# Conversion to the integer model
# --------------------------------------------------------------------------------------------

CALIBRATION_SAMPLES = 64


def write_calibration_file(path: Path, samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> None:
    """Training-distribution problems (prompt, trace, answer, EOS), one per line, as text."""
    rng = random.Random(f"calibration/{seed}")
    lines = []
    for _ in range(samples):
        problem = make_problem(rng)
        lines.append(problem.prompt + problem.completion + EOS_TOKEN)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
