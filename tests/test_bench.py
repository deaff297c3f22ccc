"""The inference benchmark's machinery, on a small random checkpoint (no timing asserted)."""

from __future__ import annotations

import shutil

import onnx
from onnx import numpy_helper

from optinfer.models import bench


def test_workers_measure_every_runtime_and_the_json_has_the_issue_keys(
        random_checkpoint, random_model, tmp_path):
    workdir = tmp_path / "bench"
    shutil.copytree(random_checkpoint, workdir / "checkpoint")
    float_path = bench.float_twin(workdir, log=lambda *_: None)
    result = bench.measure(workdir / "checkpoint", random_model, float_path, tokens=6,
                           prompt_len=5, threads=1, log=lambda *_: None)
    for key in ("decode_speedup_vs_ort_fp32", "decode_speedup_vs_torch_fp32",
                "verify_over_generate", "bandwidth_fraction", "peak_rss_bytes"):
        assert result[key] > 0, key
    assert result["generated_tokens"] == 6
    rounds = result["rounds"]
    assert len(rounds) == bench.INTEGER_ROUNDS
    for r in rounds:  # each round's verification: the median of its passes
        runs = sorted(r["verify_runs_s"])
        assert len(runs) == bench.VERIFY_RUNS and r["verify_s"] == runs[len(runs) // 2]
        assert r["verify_over_generate"] == r["verify_s"] / r["generate_s"]
    ratios = sorted(r["verify_over_generate"] for r in rounds)
    assert result["verify_over_generate"] == ratios[len(ratios) // 2]
    assert result["generate_s"] == sorted(r["generate_s"] for r in rounds)[len(rounds) // 2]
    # Each runtime was measured in its own process: the float ones hold more weight bytes.
    assert result["peak_rss_bytes"] != result["torch_fp32_peak_rss_bytes"]
    # Generation and verification each in their own process, as provider and watchtower are
    # (their peaks on this small model may coincide to the page: the processes are told apart
    # by their ids).
    pids = [pid for r in rounds for pid in r["processes"].values()]
    assert len(set(pids)) == len(pids) == 2 * bench.INTEGER_ROUNDS
    assert result["peak_rss_bytes"] == max(result["generate_peak_rss_bytes"],
                                           result["verify_peak_rss_bytes"])


def test_weight_bytes_per_token_counts_every_matrix_once(random_model):
    import json

    manifest = json.loads((random_model / "manifest.json").read_text())
    graph = onnx.load(str(random_model / "model.onnx"))
    consts = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    matmul_weights = {n.input[1] for n in graph.graph.node
                      if n.op_type == "MatMulInteger" and n.input[1] in consts}
    read = sum(consts[name].nbytes for name in matmul_weights)
    # plus one embedding row per token
    assert bench.weight_bytes_per_token(manifest["config"]) == read + manifest["config"][
        "hidden_size"]


def test_the_cpu_is_named_with_the_instruction_sets_that_decide_integer_speed():
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
               "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_vnni sha_ni\n\n"
               "processor\t: 1\nmodel name\t: other\n")
    assert bench.cpu_description(cpuinfo) == "AMD EPYC, family 25 model 17, avx2 avx512_vnni"
    assert bench.cpu_description("") == "unknown"


def test_the_sampling_benchmark_decodes_both_conversions_of_one_checkpoint(
        random_checkpoint, tmp_path):
    import json

    workdir = tmp_path / "bench"
    shutil.copytree(random_checkpoint, workdir / "checkpoint")
    config = workdir / "checkpoint" / "config.json"  # room for the benchmarks' context
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "max_position_embeddings": bench.BENCH_CONTEXT}))
    result = bench.bench_sampling(tokens=5, prompt_len=4, threads=1, rounds=2, workdir=workdir,
                                  log=lambda *_: None)
    assert (workdir / "integer" / "manifest.json").is_file()
    assert '"sampling": true' in (workdir / "integer-sampling" / "manifest.json").read_text()
    assert len(result["runs"]["greedy"]) == len(result["runs"]["sampled"]) == 2
    assert result["greedy_tokens_per_s"] > 0 and result["sampled_tokens_per_s"] > 0
    ratios = sorted(g / s for g, s in zip(result["runs"]["greedy"], result["runs"]["sampled"],
                                          strict=True))  # the rounded runs: close, not equal
    assert ratios[0] - 1 - 1e-3 <= result["decode_slowdown"] <= ratios[-1] - 1 + 1e-3
    assert (result["temperature"], result["top_p"]) == (0.6, 0.95)
    assert result["nodes"]["sampled"] > result["nodes"]["greedy"]  # the sampler's nodes
