"""`optinfer bench inference`: the integer model against float32 at R1-Distill-1.5B shape.

Each runtime is measured in its own subprocess (`python -m optinfer.models.bench KIND ...`),
so that its peak RSS is its own and one runtime's memory never slows another. The integer
model's generation and verification are separate processes too, as a provider's generation
process and a watchtower are, in rounds that pair each generation with the verification of
its tokens right after it. Figures are ratios measured in one run on one machine with the
same thread count.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

BENCH_CONTEXT = 1024
FLOAT_TOKENS = 24  # float baselines decode fewer tokens: their per-token rate is what counts
VERIFY_RUNS = 5
INTEGER_ROUNDS = 3  # generation then verification, each pair measured minutes apart at most


def peak_rss_bytes_of_process() -> int:
    """Peak resident set of this process image (VmHWM; ru_maxrss survives exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(length: int, vocab: int) -> list[int]:
    return np.random.default_rng(0).integers(0, vocab, size=length).tolist()


# ----------------------------------------------------------------- workers


def generate_worker(model_dir: Path, threads: int, prompt_len: int, tokens: int,
                    draw: str = "") -> dict:
    """What a provider's generation process does: the decode session only. `draw` is
    "temperature,top_p,seed" (thousandths) for a sampling model, "" for greedy."""
    from optinfer.models.runtime import IntegerModel
    from optinfer.models.sampling import Sampling

    m = IntegerModel(model_dir, threads=threads)
    sampling = Sampling(*map(int, draw.split(","))) if draw else None
    prompt = _prompt(prompt_len, m.vocab_size)
    m.generate(prompt, 2, stop_at_eos=False, draw=sampling)  # load the session, warm caches
    stamps: list[float] = []
    start = time.perf_counter()
    output = m.generate(prompt, tokens, stop_at_eos=False, draw=sampling,
                        on_token=lambda _: stamps.append(time.perf_counter()))
    return {"decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "generate_s": stamps[-1] - start, "output": output,
            "peak_rss_bytes": peak_rss_bytes_of_process(), "pid": os.getpid()}


def verify_worker(model_dir: Path, threads: int, prompt_len: int, output_csv: str) -> dict:
    """What a watchtower does: one teacher-forced pass over the generated tokens, on the
    batch session (``batching.predict_many``) only."""
    from optinfer.models.batching import predict_many
    from optinfer.models.runtime import IntegerModel

    m = IntegerModel(model_dir, threads=threads)
    prompt = _prompt(prompt_len, m.vocab_size)
    output = [int(t) for t in output_csv.split(",")]
    # One unmeasured pass of the full length loads the session and grows its arena to the
    # pass's size, as generation's first two tokens load and warm the decode session.
    sequence = m.sequence(prompt, output)
    predict_many(m, [sequence])
    # The median of several passes: one pass takes about a second where generation takes
    # tens, so a single pass is at the mercy of a shared machine's passing load.
    verify_runs = []
    for _ in range(VERIFY_RUNS):
        start = time.perf_counter()
        (predicted,) = predict_many(m, [sequence])
        verify_runs.append(time.perf_counter() - start)
        if predicted.tolist() != output:
            raise RuntimeError("teacher-forced pass disagrees with KV-cache decoding")
    return {"verify_s": statistics.median(verify_runs), "verify_runs_s": verify_runs,
            "peak_rss_bytes": peak_rss_bytes_of_process(), "pid": os.getpid()}


def ort_float_worker(float_path: Path, threads: int, prompt_len: int, tokens: int) -> dict:
    import onnxruntime as ort

    from optinfer.models.checkpoint import read_spec

    spec = read_spec(float_path.parent.parent / "checkpoint")  # workdir/{float,checkpoint}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(float_path), so, providers=["CPUExecutionProvider"])
    kv, hd = spec.num_kv_heads, spec.head_dim
    past = {}
    for i in range(spec.num_layers):
        past[f"past_k.{i}"] = np.zeros((kv, 1, 0, hd), np.float32)
        past[f"past_v.{i}"] = np.zeros((kv, 1, 0, hd), np.float32)
    feed, position, stamps = _prompt(prompt_len, spec.vocab_size), 0, []
    for _ in range(tokens):
        out = sess.run(None, {"tokens": np.asarray(feed, np.int64),
                              "positions": np.arange(position, position + len(feed)), **past})
        stamps.append(time.perf_counter())
        for i in range(spec.num_layers):
            past[f"past_k.{i}"], past[f"past_v.{i}"] = out[1 + 2 * i], out[2 + 2 * i]
        position += len(feed)
        feed = [int(out[0][-1])]
    return {"decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "peak_rss_bytes": peak_rss_bytes_of_process(), "pid": os.getpid()}


def torch_worker(checkpoint: Path, threads: int, prompt_len: int, tokens: int) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(threads)
    model = Qwen2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([_prompt(prompt_len, model.config.vocab_size)])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = timed(1)
    total = timed(tokens)
    return {"decode_tokens_per_s": (tokens - 1) / (total - prefill),
            "peak_rss_bytes": peak_rss_bytes_of_process(), "pid": os.getpid()}


# ------------------------------------------------------------------ driver


def copy_bandwidth(size_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Memory bandwidth from a large copy, in bytes/s, STREAM convention (read + written).

    A copy of S bytes moves 2*S bytes through memory. Counting S only understates what the
    memory system delivers to a read-only stream: on this project's 2-core machine a decode
    step read its weights faster than "S per copy time", which is why the STREAM figure is
    the bound. Best of `repeats`.
    """
    src = np.ones(size_bytes, np.uint8)
    dst = np.ones_like(src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def weight_bytes_per_token(config: dict, weight_bits: int = 7) -> int:
    """int8 weight bytes one decode step reads: every linear, the lm_head (two int8 planes
    each with 13-bit weights), one embedding row."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_heads"] * config["head_dim"], config["num_kv_heads"] * config["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    planes = 2 if weight_bits == 13 else 1
    return planes * (config["num_layers"] * per_layer + config["vocab_size"] * h) + h


def _run_worker(kind: str, *args) -> dict:
    cmd = [sys.executable, "-m", "optinfer.models.bench", kind, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} benchmark failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(workdir: Path, layers: int, log, linear_input_bits: int = 8, weight_bits: int = 7
            ) -> tuple[Path, Path, Path]:
    """Random R1-Distill-1.5B-shape checkpoint, its integer model and float32 twin (cached).

    The integer model with 16-bit linear inputs is workdir/integer-16 (8 bits: integer; the
    fine graph, 13-bit weights: integer-16-w13)."""
    integer = integer_model(workdir, layers, log, linear_input_bits, weight_bits)
    return workdir / "checkpoint", integer, float_twin(workdir, log)


def default_workdir(layers: int) -> Path:
    """Where the R1-shape benchmarks keep their random model of `layers` layers."""
    return Path.home() / ".cache" / "optinfer" / f"r1-distill-1.5b-{layers}l"


def integer_model(workdir: Path, layers: int, log, linear_input_bits: int = 8,
                  weight_bits: int = 7, sampling: bool = False) -> Path:
    """The integer model of workdir's random R1-Distill-1.5B-shape checkpoint, both written
    once (see :func:`prepare` for the directory names; with `sampling`, "-sampling" more)."""
    from optinfer.models.checkpoint import write_random_checkpoint
    from optinfer.models.converter import convert

    checkpoint = workdir / "checkpoint"
    integer = workdir / ("integer" if linear_input_bits == 8 else f"integer-{linear_input_bits}")
    if weight_bits != 7:
        integer = integer.with_name(f"{integer.name}-w{weight_bits}")
    if sampling:
        integer = integer.with_name(f"{integer.name}-sampling")
    if not (checkpoint / "config.json").is_file():
        log(f"writing a random R1-Distill-1.5B-shape checkpoint ({layers} layers) to {workdir}")
        write_random_checkpoint(checkpoint, preset="r1-distill-1.5b", num_layers=layers)
    if not (integer / "manifest.json").is_file():
        log(f"converting to the integer model ({linear_input_bits}-bit linear inputs, "
            f"{weight_bits}-bit weights{', sampling' if sampling else ''})")
        convert(checkpoint, integer, max_context=BENCH_CONTEXT,
                linear_input_bits=linear_input_bits, weight_bits=weight_bits,
                sampling=sampling)
    return integer


def bench_sampling(layers: int = 28, tokens: int = 64, prompt_len: int = 32, threads: int = 2,
                   rounds: int = 3, workdir: Path | None = None, log=print,
                   temperature: float = 0.6, top_p: float = 0.95) -> dict:
    """The sampler's cost in single-stream decoding at R1-Distill-1.5B shape: the greedy
    model's decode tokens/s against the sampling conversion of the same checkpoint drawing at
    `temperature` and `top_p`, in alternating rounds (a machine's speed drifts);
    ``decode_slowdown`` is the median over rounds of greedy / sampled, less 1."""
    from optinfer.errors import UserError
    from optinfer.models.sampling import Sampling

    if prompt_len + tokens > BENCH_CONTEXT:
        raise UserError(f"prompt + tokens must be at most {BENCH_CONTEXT}")
    if tokens < 2 or rounds < 1:
        raise UserError("--tokens must be at least 2 and --rounds at least 1")
    draw = Sampling.from_floats(temperature, top_p, seed=1)
    workdir = Path(workdir or default_workdir(layers))
    greedy = integer_model(workdir, layers, log)
    drawing = integer_model(workdir, layers, log, sampling=True)
    # Each run in a process of its own, as a provider's generation process: two models in
    # one process decoded 9% apart the wrong way round (the one loaded first the slower).
    runs: dict[str, list[float]] = {"greedy": [], "sampled": []}
    pair = [("greedy", greedy, ""), ("sampled", drawing,
                                     f"{draw.temperature},{draw.top_p},{draw.seed}")]
    for i in range(rounds):
        order = pair if i % 2 == 0 else pair[::-1]  # neither always runs first
        log(f"round {i + 1}/{rounds}: {tokens} tokens {order[0][0]}, then {order[1][0]}")
        for name, model_dir, model_draw in order:
            runs[name].append(_run_worker("generate", model_dir, threads, prompt_len, tokens,
                                          model_draw)["decode_tokens_per_s"])
    median = {name: statistics.median(rates) for name, rates in runs.items()}
    nodes = {name: json.loads((model_dir / "manifest.json").read_text())["nodes"]
             for name, model_dir, _ in pair}
    # Each round's two runs are minutes apart at most: their ratio sees the same machine,
    # where the medians of each side, over a drifting machine, moved by 3 points between runs.
    slowdown = statistics.median(g / d for g, d in zip(runs["greedy"], runs["sampled"],
                                                         strict=True)) - 1
    return {"benchmark": "sampling", "cpu": cpu_name(), "threads": threads,
            "date": time.strftime("%Y-%m-%d"), "layers": layers, "tokens": tokens,
            "prompt_tokens": prompt_len, "temperature": draw.temperature / 1000,
            "top_p": draw.top_p / 1000, "greedy_tokens_per_s": round(median["greedy"], 3),
            "sampled_tokens_per_s": round(median["sampled"], 3),
            "decode_slowdown": round(slowdown, 4),
            "runs": {name: [round(r, 3) for r in rates] for name, rates in runs.items()},
            "nodes": nodes}


def float_twin(workdir: Path, log) -> Path:
    """The float32 ONNX twin of workdir/checkpoint, written to workdir/float once."""
    from optinfer.models.float_onnx import FLOAT_GRAPH, write_float_model

    path = workdir / "float" / FLOAT_GRAPH
    if not path.is_file():
        log("writing the float32 ONNX twin")
        write_float_model(workdir / "checkpoint", path.parent, BENCH_CONTEXT)
    return path


def measure(checkpoint: Path, integer: Path, float_path: Path, tokens: int, prompt_len: int,
            threads: int, log) -> dict:
    """Run the three workers and the bandwidth probe; the benchmark's JSON document."""
    manifest = json.loads((integer / "manifest.json").read_text())
    config = manifest["config"]
    # Rounds of generation followed at once by the verification of its tokens, each in a
    # fresh process: a shared machine's speed drifts over minutes, and a ratio of two figures
    # measured back to back, taken as the median over rounds, is what survives that drift.
    rounds = []
    for r in range(INTEGER_ROUNDS):
        log(f"integer model, round {r + 1}/{INTEGER_ROUNDS}: {tokens} tokens after a "
            f"{prompt_len}-token prompt, {threads} threads, then their verification")
        generated = _run_worker("generate", integer, threads, prompt_len, tokens)
        checked = _run_worker("verify", integer, threads, prompt_len,
                              ",".join(map(str, generated["output"])))
        if rounds and generated["output"] != rounds[0][0]["output"]:
            raise RuntimeError("integer generation is not reproducible across processes")
        rounds.append((generated, checked))
    per_round = [{"generate_s": g["generate_s"], "decode_tokens_per_s": g["decode_tokens_per_s"],
                  "verify_s": c["verify_s"], "verify_runs_s": c["verify_runs_s"],
                  "verify_over_generate": c["verify_s"] / g["generate_s"],
                  "processes": {"generate": g["pid"], "verify": c["pid"]}}
                 for g, c in rounds]
    decode = statistics.median(r["decode_tokens_per_s"] for r in per_round)
    generate_rss = max(g["peak_rss_bytes"] for g, _ in rounds)
    verify_rss = max(c["peak_rss_bytes"] for _, c in rounds)
    float_tokens = min(tokens, FLOAT_TOKENS)
    log(f"float32 ONNX Runtime: {float_tokens} tokens")
    ort_fp32 = _run_worker("ort-float", float_path, threads, prompt_len, float_tokens)
    log(f"float32 torch (transformers): {float_tokens} tokens")
    torch_fp32 = _run_worker("torch", checkpoint, threads, prompt_len, float_tokens)
    bandwidth = copy_bandwidth()
    weight_bits = manifest.get("weight_bits", 7)
    per_token = weight_bytes_per_token(config, weight_bits)
    bound = bandwidth / per_token
    return {
        "linear_input_bits": manifest.get("linear_input_bits", 8),
        "weight_bits": weight_bits,
        "threads": threads, "prompt_tokens": prompt_len,
        "generated_tokens": len(rounds[0][0]["output"]),
        "decode_tokens_per_s": decode,
        "ort_fp32_decode_tokens_per_s": ort_fp32["decode_tokens_per_s"],
        "torch_fp32_decode_tokens_per_s": torch_fp32["decode_tokens_per_s"],
        "decode_speedup_vs_ort_fp32": decode / ort_fp32["decode_tokens_per_s"],
        "decode_speedup_vs_torch_fp32": decode / torch_fp32["decode_tokens_per_s"],
        "generate_s": statistics.median(r["generate_s"] for r in per_round),
        "verify_s": statistics.median(r["verify_s"] for r in per_round),
        "verify_over_generate": statistics.median(r["verify_over_generate"] for r in per_round),
        "rounds": per_round,
        "weight_bytes_per_token": per_token, "copy_bandwidth_bytes_per_s": bandwidth,
        "bandwidth_bound_tokens_per_s": bound,
        "bandwidth_fraction": decode / bound,
        # Generation (a provider's generation process) and verification (a watchtower) are
        # separate processes in the product, each with its own ONNX Runtime session.
        "generate_peak_rss_bytes": generate_rss,
        "verify_peak_rss_bytes": verify_rss,
        "peak_rss_bytes": max(generate_rss, verify_rss),
        "ort_fp32_peak_rss_bytes": ort_fp32["peak_rss_bytes"],
        "torch_fp32_peak_rss_bytes": torch_fp32["peak_rss_bytes"],
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "date": date.today().isoformat(),
    }


def bench_inference(layers: int = 28, tokens: int = 256, prompt_len: int = 32, threads: int = 2,
                    workdir: Path | None = None, log=print, linear_input_bits: int = 8,
                    weight_bits: int = 7) -> dict:
    from optinfer.errors import UserError
    from optinfer.models.converter import check_linear_input_bits, check_weight_bits

    if prompt_len + tokens > BENCH_CONTEXT:
        raise UserError(f"prompt + tokens must be at most {BENCH_CONTEXT}")
    if not 1 <= layers <= 28:
        raise UserError("--layers must be in 1..28")
    check_linear_input_bits(linear_input_bits)  # before minutes of writing a checkpoint
    check_weight_bits(weight_bits, linear_input_bits)
    workdir = workdir or default_workdir(layers)
    checkpoint, integer, float_path = prepare(Path(workdir), layers, log, linear_input_bits,
                                              weight_bits)
    result = measure(checkpoint, integer, float_path, tokens, prompt_len, threads, log)
    return {"model": f"R1-Distill-Qwen-1.5B shape, random weights, {layers} layers", **result}


# The instruction sets that decide MatMulInteger's speed (docs/performance.md): results from
# machines that differ in them are not comparable.
INTEGER_ISA_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description(cpuinfo: str) -> str:
    """'model name, family F model M, <integer ISA flags>' from the text of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    parts = [fields.get("model name", "unknown")]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    isa = [flag for flag in INTEGER_ISA_FLAGS if flag in flags]
    if isa:
        parts.append(" ".join(isa))
    return ", ".join(parts)


def cpu_name() -> str:
    try:
        return cpu_description(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or "unknown"


if __name__ == "__main__":
    kind, target, threads_arg, prompt_arg, last_arg = sys.argv[1:6]
    if kind == "verify":
        result = verify_worker(Path(target), int(threads_arg), int(prompt_arg), last_arg)
    elif kind == "generate":
        result = generate_worker(Path(target), int(threads_arg), int(prompt_arg), int(last_arg),
                                 *sys.argv[6:7])
    else:
        worker = {"ort-float": ort_float_worker, "torch": torch_worker}[kind]
        result = worker(Path(target), int(threads_arg), int(prompt_arg), int(last_arg))
    print(json.dumps(result))
