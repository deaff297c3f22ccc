"""Running a converted integer model on ONNX Runtime: generate, verify, trace.

Sessions are configured for determinism: the graph is executed as written (no graph
optimisation, no node fusion), nodes run sequentially, and the onnxruntime version must be the
one the model was converted for. The integer ops themselves are exact, so the result does not
depend on the thread count or the CPU.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from optinfer.errors import UserError
from optinfer.models import opset
from optinfer.models.batching import batched_decode_graph, empty_cache
from optinfer.models.qwen2_graph import SAMPLING_HEADER
from optinfer.models.sampling import PARAMETERS, Sampling, verify_sequence

PINNED_ONNXRUNTIME = "1.32.0"


@dataclass(frozen=True)
class OutputCheck:
    """Outcome of teacher-forced verification of a claimed output."""

    valid: bool
    first_mismatch: int | None  # index into the output of the first wrong token
    reason: str


def session_options(threads: int = 1) -> ort.SessionOptions:
    """ORT options that make a run reproducible: the frozen graph, run sequentially."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.use_deterministic_compute = True
    # No precomputed memory pattern: it sized one block for the verification pass's peak
    # that left it 0.33 GB above allocating on demand through the arena (R1-1.5B shape,
    # 287 positions), at the same speed. Memory layout never changes a value.
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    return so


def parse_token_list(text: str, what: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3], with a clear error for anything else."""
    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not tokens:
        raise UserError(f"{what} is empty")
    return tokens


class IntegerModel:
    """A converted model directory: manifest, tokenizer and ONNX Runtime sessions."""

    def __init__(self, model_dir: Path | str, threads: int = 1):
        self.dir = Path(model_dir)
        manifest_path = self.dir / "manifest.json"
        if not self.dir.is_dir():
            raise UserError(f"model directory {self.dir} does not exist")
        if not manifest_path.is_file():
            raise UserError(f"{self.dir} is not a converted model (no manifest.json); "
                            "create one with `optinfer model convert`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            config = self.manifest["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{manifest_path} is not a valid optinfer manifest ({err}); "
                            "convert the model again") from None
        if ort.__version__ != self.manifest["onnxruntime"]:
            raise UserError(f"this model is pinned to onnxruntime {self.manifest['onnxruntime']}, "
                            f"but {ort.__version__} is installed")
        if self.manifest.get("opset_version") != opset.OPSET_VERSION:
            raise UserError(f"{self.dir} was converted for op-set version "
                            f"{self.manifest.get('opset_version')}, but this optinfer implements "
                            f"version {opset.OPSET_VERSION}: convert the model again")
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.vocab_size: int = config["vocab_size"]
        self.eos_ids: tuple[int, ...] = tuple(config["eos_token_ids"])
        self.max_context: int = self.manifest["max_context"]
        self.num_layers: int = config["num_layers"]
        self.num_kv_heads: int = config["num_kv_heads"]
        self.head_dim: int = config["head_dim"]
        self._sessions: dict[str, ort.InferenceSession] = {}
        # Two threads asking for a session not yet made would each build one (seconds and a
        # copy of the weights each at R1 shape); the lock makes the second wait for the first.
        self._sessions_lock = threading.Lock()

    # ------------------------------------------------------------- sessions

    def session(self, kind: str) -> ort.InferenceSession:
        """The "verify", "decode", "decode_batch" (``batching.batched_decode_graph``) or
        "trace" session, created once, whichever thread asks first."""
        session = self._sessions.get(kind)
        if session is None:
            with self._sessions_lock:
                session = self._sessions.get(kind)
                if session is None:
                    session = self._sessions[kind] = self._new_session(kind)
        return session

    def _new_session(self, kind: str) -> ort.InferenceSession:
        so = session_options(self.threads)
        if kind in ("trace", "decode_batch"):
            model = (self.trace_graph() if kind == "trace" else batched_decode_graph(
                onnx.load(str(self.dir / self.manifest["graphs"]["decode"]),
                          load_external_data=False), self.max_context))
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.dir))
            source = model.SerializeToString()
        else:
            source = str(self.dir / self.manifest["graphs"][kind])
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])

    def verify_graph(self) -> onnx.ModelProto:
        """The committed graph's structure (its large constants stay in the constants file)."""
        path = self.dir / self.manifest["graphs"]["verify"]
        return onnx.load(str(path), load_external_data=False)

    def trace_graph(self) -> onnx.ModelProto:
        """The verify graph with every node's output exposed, in node order."""
        model = self.verify_graph()
        exposed = {o.name for o in model.graph.output}
        for node in model.graph.node:
            for name in node.output:
                if name not in exposed:
                    model.graph.output.append(onnx.ValueInfoProto(name=name))
        return model

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{self.dir} has no tokenizer.json; pass token ids instead of text")
        return Tokenizer.from_file(str(path))

    # ---------------------------------------------------------------- checks

    def check_tokens(self, tokens: list[int], what: str) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"{what}: token id {bad[0]} is outside the vocabulary "
                            f"(0..{self.vocab_size - 1})")

    def check_length(self, length: int, what: str) -> None:
        if length > self.max_context:
            raise UserError(f"{what}: {length} tokens exceed the model's context of "
                            f"{self.max_context}")

    # ------------------------------------------------------------ inference

    def encode(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text).ids
        except Exception as err:  # tokenizers raises a bare Exception for unknown characters
            raise UserError(f"the model's tokenizer cannot encode the prompt: {err}") from None
        if not ids:
            raise UserError("the prompt encodes to no tokens")
        return ids

    def decode_text(self, tokens: list[int]) -> str:
        body = tokens[:-1] if tokens and tokens[-1] in self.eos_ids else tokens
        return self.tokenizer.decode(body, skip_special_tokens=False)

    # ------------------------------------------------------------- sampling

    @property
    def samples(self) -> bool:
        """Whether the graphs draw tokens (converted with `--sampling`, docs/models.md)."""
        return bool(self.manifest.get("sampling", False))

    def check_draw(self, draw: Sampling | None) -> Sampling:
        """`draw` (greedy when None), refused with a UserError where the model cannot."""
        draw = draw or Sampling()
        if not draw.greedy and not self.samples:
            raise UserError(f"{self.dir} decodes greedily only (temperature 0); convert the "
                            "checkpoint again with --sampling to sample")
        return draw

    def draw_feeds(self, draws: list[Sampling]) -> dict[str, np.ndarray]:
        """A sampling graph's temperature, top-p and seed inputs, one row per draw (nothing
        for a greedy model)."""
        if not self.samples:
            return {}
        return {name: np.asarray([[getattr(d, name)] for d in draws], np.int64).reshape(-1, 1)
                for name in PARAMETERS}

    # ------------------------------------------------------------- generate

    def generate(self, prompt: list[int], max_tokens: int, on_token=None,
                 stop_at_eos: bool = True, draw: Sampling | None = None) -> list[int]:
        """Decoding with the KV cache, greedy or drawn by `draw`; stops after EOS or
        max_tokens tokens.

        on_token(token) is called as each token is produced. stop_at_eos=False (benchmarks)
        always produces max_tokens tokens.
        """
        params = self.draw_feeds([self.check_draw(draw)])
        self.check_tokens(prompt, "prompt")
        if max_tokens < 1:
            raise UserError(f"max tokens must be >= 1, got {max_tokens}")
        self.check_length(len(prompt) + max_tokens - 1, "prompt plus max tokens")
        sess = self.session("decode")
        past = empty_cache(self, sess)
        out_names = [o.name for o in sess.get_outputs()]
        feed_tokens, position, output = list(prompt), 0, []
        while True:
            n = len(feed_tokens)
            feeds = {"tokens": np.asarray(feed_tokens, np.int64),
                     "positions": np.arange(position, position + n, dtype=np.int64),
                     **params, **past}
            results = sess.run(out_names, feeds)
            token = int(results[0][-1])
            for j in range(self.num_layers):
                past[f"past_k.{j}"] = results[1 + 2 * j]
                past[f"past_v.{j}"] = results[2 + 2 * j]
            output.append(token)
            if on_token:
                on_token(token)
            if (stop_at_eos and token in self.eos_ids) or len(output) >= max_tokens:
                return output
            position += n
            feed_tokens = [token]

    def sequence(self, prompt: list[int], output: list[int], draw: Sampling | None = None
                 ) -> np.ndarray:
        """The verify graph's input: [len(prompt)] ++ prompt ++ output[:-1], or on a sampling
        model [len(prompt), temperature, top_p, seed] ++ prompt ++ output[:-1]."""
        self.check_tokens(prompt, "prompt tokens")
        self.check_tokens(output, "output tokens")
        if not prompt or not output:
            raise UserError("prompt and output must each hold at least one token")
        self.check_length(len(prompt) + len(output) - 1, "prompt plus output")
        return verify_sequence(prompt, output, self.leaf_draw(draw))

    def leaf_draw(self, draw: Sampling | None) -> Sampling | None:
        """The draw the verify input's header holds (`sampling.verify_sequence`): `draw`
        (greedy when None) on a sampling model, None on a greedy-only one (whose draw must
        be greedy)."""
        draw = self.check_draw(draw)
        return draw if self.samples else None

    @property
    def header_length(self) -> int:
        """How many integers of the verify graph's input come before the tokens."""
        return SAMPLING_HEADER if self.samples else 1

    def predict(self, prompt: list[int], output: list[int], draw: Sampling | None = None
                ) -> np.ndarray:
        """Teacher-forced predictions for every output position, in one pass."""
        return self.predict_sequence(self.sequence(prompt, output, draw))

    def predict_sequence(self, sequence: np.ndarray) -> np.ndarray:
        """`predict` on the verify graph's input itself, unchecked: ONNX Runtime fails on a
        token id outside the vocabulary or a sequence beyond the context. The last output
        token is not in it, so a claim ending in any id can be run this way."""
        return self.session("verify").run(["next_tokens"], {"sequence": sequence})[0]

    def verify(self, prompt: list[int], output: list[int], max_tokens: int | None = None,
               draw: Sampling | None = None) -> OutputCheck:
        """Is `output` exactly what decoding `prompt` (greedy, or drawn by `draw`) produces?"""
        return self.check_output(output, self.predict(prompt, output, draw), max_tokens)

    def check_output(self, output: list[int], predicted: np.ndarray,
                max_tokens: int | None = None) -> OutputCheck:
        """`verify`'s judgement of `output` from the model's teacher-forced `predicted`."""
        wrong = np.flatnonzero(predicted != np.asarray(output, np.int64))
        if wrong.size:
            i = int(wrong[0])
            return OutputCheck(False, i,
                               f"token {i} is {output[i]}, the model gives {predicted[i]}")
        # Greedy decoding stops at the first EOS: an EOS before the end makes the claim invalid.
        early_eos = [i for i, t in enumerate(output[:-1]) if t in self.eos_ids]
        if early_eos:
            return OutputCheck(False, early_eos[0] + 1, "output continues after EOS")
        if max_tokens is not None:
            if len(output) > max_tokens:
                return OutputCheck(False, max_tokens, f"output longer than max tokens {max_tokens}")
            if output[-1] not in self.eos_ids and len(output) < max_tokens:
                return OutputCheck(False, None, "output stops before EOS and before max tokens")
        return OutputCheck(True, None, "ok")

    def state_root(self, prompt: list[int], output: list[int], draw: Sampling | None = None
                   ) -> tuple[int, bytes]:
        """Node count N and state root S_N of the verification trace (docs/protocol.md)."""
        from optinfer.prover.commitments import state_root, tensor_root

        sequence, outputs = self.trace(prompt, output, draw)
        return len(outputs), state_root([tensor_root(t) for t in (sequence, *outputs)])

    def trace(self, prompt: list[int], output: list[int], draw: Sampling | None = None
              ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The verify graph's input and every node output, in node order (nodes 1..N)."""
        sequence = self.sequence(prompt, output, draw)
        return sequence, self.trace_sequence(sequence)

    def trace_sequence(self, sequence: np.ndarray) -> list[np.ndarray]:
        """`trace`'s node outputs from the verify graph's input itself, unchecked (as
        `predict_sequence`)."""
        names = [node.output[0] for node in self.verify_graph().graph.node]
        return self.session("trace").run(names, {"sequence": sequence})
