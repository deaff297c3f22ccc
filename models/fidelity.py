"""How faithful the integer tiny-r1 is to its float checkpoint, on held-out problems.

Two figures (docs/models.md): task accuracy of each model, and token agreement, the fraction
of positions where the integer model, teacher-forced on the float model's own output, predicts
the float model's token.
"""

from __future__ import annotations

from pathlib import Path

from optinfer.models.runtime import IntegerModel


def measure_fidelity(float_dir: Path, integer_dir: Path, problems: int = 200, seed: int = 0,
                     progress=None) -> dict:
    from optinfer.models.tiny_r1 import (
        MAX_NEW_TOKENS,
        build_tokenizer,
        encode_prompt,
        evaluate,
        float_generate_fn,
        held_out_problems,
    )

    held_out = held_out_problems(problems, seed=seed)
    tokenizer = build_tokenizer()
    float_generate = float_generate_fn(float_dir)
    integer = IntegerModel(integer_dir)
    float_outputs: dict[str, list[int]] = {}

    def float_fn(prompt_ids: list[int], max_new: int) -> list[int]:
        out = float_generate(prompt_ids, max_new)
        float_outputs[repr(prompt_ids)] = out
        if progress:
            progress(len(float_outputs) / (2 * problems), "float model")
        return out

    float_scores = evaluate(float_fn, held_out, tokenizer)
    done = []

    def integer_fn(prompt_ids: list[int], max_new: int) -> list[int]:
        done.append(1)
        if progress:
            progress(0.5 + len(done) / (2 * problems), "integer model")
        return integer.generate(prompt_ids, max_new)

    integer_scores = evaluate(integer_fn, held_out, tokenizer)
    agree = total = 0
    for problem in held_out:
        prompt = encode_prompt(tokenizer, problem.prompt)
        reference = float_outputs[repr(prompt)]
        predicted = integer.predict(prompt, reference).tolist()
        agree += sum(p == r for p, r in zip(predicted, reference, strict=True))
        total += len(reference)
    return {
        "problems": problems,
        "seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "float_accuracy": float_scores["accuracy"],
        "integer_accuracy": integer_scores["accuracy"],
        "accuracy_gap_points": 100 * (float_scores["accuracy"] - integer_scores["accuracy"]),
        "token_agreement": agree / total,
        "tokens_compared": total,
        "integer_failures": integer_scores["failures"],
    }
