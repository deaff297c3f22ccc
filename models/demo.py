"""`optinfer model demo`: the integer model's part of the protocol, on tiny-r1, in one screen.

A question is answered by KV-cache generation; the answer verifies in one teacher-forced pass;
a forged answer (one token changed) does not; and the verification trace is committed to a
state root. Every step is checked: `ok` is false if any expected outcome did not happen.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from optinfer.models.runtime import IntegerModel

DEMO_MAX_TOKENS = 48


def run_model_demo(model: IntegerModel, console: Console | None = None,
                   question: str | None = None) -> dict:
    from optinfer.models.tiny_r1 import answer_from_completion, held_out_problems

    problem = held_out_problems(1, seed=2026)[0]
    question = question or problem.prompt
    say = console.print if console else (lambda *a, **k: None)
    say(f"[bold]model[/bold] {model.dir}  root {model.manifest['model_root'][:18]}…  "
        f"{model.manifest['nodes']} integer nodes, {model.manifest['float_tensors']} float")

    prompt = model.encode(question)
    started = time.perf_counter()
    tokens = model.generate(prompt, DEMO_MAX_TOKENS)
    generate_s = time.perf_counter() - started
    text = model.decode_text(tokens)
    answer = answer_from_completion(text)
    expected = problem.answer if question == problem.prompt else None
    say(f"[bold]question[/bold] {question}")
    say(f"[bold]answer  [/bold] {text}", markup=True, highlight=False)

    started = time.perf_counter()
    honest = model.verify(prompt, tokens, max_tokens=DEMO_MAX_TOKENS)
    verify_s = time.perf_counter() - started
    say(f"verify (one pass over {len(prompt) + len(tokens) - 1} tokens): "
        + ("[green]valid[/green]" if honest.valid else f"[red]INVALID[/red] {honest.reason}"))

    # Forge the last digit of the answer (the token before EOS), as a lying provider would.
    forged = list(tokens)
    position = len(forged) - 2 if len(forged) >= 2 else 0
    digits = model.encode("0123456789")[-10:]
    forged[position] = next(d for d in digits if d != forged[position])
    forged_verdict = model.verify(prompt, forged, max_tokens=DEMO_MAX_TOKENS)
    say(f"forged answer {model.decode_text(forged)!r}: "
        + ("[green]rejected[/green]" if not forged_verdict.valid else "[red]ACCEPTED[/red]")
        + f" at token {forged_verdict.first_mismatch}")

    nodes, root = model.state_root(prompt, tokens)
    say(f"trace: {nodes} nodes committed, state root 0x{root.hex()[:16]}…")

    ok = honest.valid and not forged_verdict.valid and forged_verdict.first_mismatch == position
    result = {
        "ok": ok, "question": question, "answer_text": text, "answer": answer,
        "expected": expected, "correct": expected is not None and answer == expected,
        "prompt_tokens": prompt, "tokens": tokens, "valid": honest.valid,
        "forged_rejected": not forged_verdict.valid,
        "forged_first_mismatch": forged_verdict.first_mismatch,
        "nodes": nodes, "state_root": "0x" + root.hex(),
        "model_root": model.manifest["model_root"],
        "generate_s": round(generate_s, 3), "verify_s": round(verify_s, 3),
    }
    if console:
        table = Table("check", "result", title="tiny-r1 integer model")
        for key in ("correct", "valid", "forged_rejected", "generate_s", "verify_s", "nodes"):
            table.add_row(key, str(result[key]))
        console.print(table)
        console.print("[green]all checks passed[/green]" if ok else "[red]a check failed[/red]")
    return result
