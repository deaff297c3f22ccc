"""Continuous batching on the integer decode graph, with every sequence's tokens bit-identical
to its generation alone.

The converter's decode graph (``qwen2_graph``, mode "decode") runs one sequence: its new rows
see the cache's keys up to their own position. :func:`batched_decode_graph` derives from it,
when a model loads, a graph for a ragged batch of sequences: each row also names its sequence,
each cached key its position and sequence, and the mask hides from a row every key of another
sequence as well as every key after its position. Nothing else changes, and nothing else
needs to: every other op of the graph is row-local with static scales (RMSNorm, the linear
layers' exact integer sums, the requantisations, the argmax), and a hidden key adds exactly
nothing to a row's attention (its exp entry is 0, so its row max, exp sum and value sum are
the visible keys' alone). A sequence's tokens are therefore the same alone, in any batch,
joining or leaving at any step, and in the committed verify graph (``tests/test_batching.py``
checks every graph variant). The derived graph is built in memory from the decode graph the
manifest pins; the model's files and its id do not change.

:class:`DecodeBatch` runs it: sequences join between steps (the next step feeds a joining
sequence's whole prompt beside the others' last tokens) and leave after their last token
(their keys leave the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optinfer.errors import UserError
from optinfer.models.qwen2_graph import FINAL_POSITIONS
from optinfer.models.sampling import PARAMETERS, Sampling

MAX_SEQUENCE_SLOT = (1 << 16) - 1
"""Sequence slots in a batch run 0..this: slot distance^2 * context stays far inside int64."""

#: The decode graph's tensors the derivation replaces (names ``qwen2_graph`` gives them;
#: in a sampling graph, its FINAL_POSITIONS too).
KEY_POSITIONS, KEY_ORDER, FINAL_ROWS, FINAL_ROW_COUNT = (
    "key_positions", "kpos", "final.rows", "final.length.1d")


def batched_decode_graph(decode: onnx.ModelProto, max_context: int) -> onnx.ModelProto:
    """The batch form of `decode` (a converter's decode graph, see the module docstring).

    New inputs: ``sequences`` (T,) the slot of each new row's sequence, ``predict_rows`` (L,)
    the rows whose next token is wanted (each sequence's last), ``past_positions`` and
    ``past_sequences`` (P,) the position and slot of each cached key. ``next_tokens`` is then
    (L,), and the present K/V are the past's keys followed by the T new ones, as before."""
    model = onnx.ModelProto()
    model.CopyFrom(decode)
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for name in (KEY_POSITIONS, KEY_ORDER, FINAL_ROWS):
        if name not in producers:
            raise ValueError(f"not a decode graph of this converter: no tensor {name!r}")
    graph.input.extend([helper.make_tensor_value_info(name, TensorProto.INT64, [dim])
                        for name, dim in (("sequences", "T"), ("predict_rows", "L"),
                                          ("past_positions", "P"), ("past_sequences", "P"))])
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray([1, -1], np.int64), "batch.row_shape"),
        numpy_helper.from_array(np.asarray([-1, 1], np.int64), "batch.column_shape"),
        numpy_helper.from_array(np.asarray(max_context, np.int64), "batch.context"),
    ])
    replacements = {
        # Keys are the cache followed by the new rows, each at its own position.
        KEY_POSITIONS: [helper.make_node("Concat", ["past_positions", "positions"],
                                         [KEY_POSITIONS], axis=0)],
        # (T, S): a key of another sequence orders after every position of this one,
        # (slot distance)^2 * context + its position exceeding any query position.
        KEY_ORDER: [
            helper.make_node("Concat", ["past_sequences", "sequences"], ["batch.key_slots"],
                             axis=0),
            helper.make_node("Reshape", ["batch.key_slots", "batch.row_shape"],
                             ["batch.kslot"]),
            helper.make_node("Reshape", ["sequences", "batch.column_shape"], ["batch.qslot"]),
            helper.make_node("Sub", ["batch.kslot", "batch.qslot"], ["batch.distance"]),
            helper.make_node("Mul", ["batch.distance", "batch.distance"], ["batch.distance2"]),
            helper.make_node("Mul", ["batch.distance2", "batch.context"], ["batch.apart"]),
            helper.make_node("Reshape", [KEY_POSITIONS, "batch.row_shape"], ["batch.kpos"]),
            helper.make_node("Add", ["batch.apart", "batch.kpos"], [KEY_ORDER]),
        ],
        # The rows asked for, not the last one.
        FINAL_ROWS: [helper.make_node("Gather", [graph.node[producers[FINAL_ROWS]].input[0],
                                                 "predict_rows"], [FINAL_ROWS], axis=0)],
        FINAL_ROW_COUNT: [helper.make_node("Shape", ["predict_rows"], [FINAL_ROW_COUNT])],
    }
    if FINAL_POSITIONS in producers:  # a sampling graph: the rows asked for are its keys
        replacements[FINAL_POSITIONS] = [helper.make_node(
            "Gather", ["positions", "predict_rows"], [FINAL_POSITIONS], axis=0)]
    nodes = []
    for node in graph.node:
        replaced = next((replacements[out] for out in node.output if out in replacements), None)
        nodes.extend([node] if replaced is None else replaced)
    del graph.node[:]
    graph.node.extend(_live(nodes, {out.name for out in graph.output}))
    for value in graph.output:
        if value.name == "next_tokens":
            value.type.tensor_type.shape.dim[0].dim_param = "L"
    graph.name += "-batch"
    return model


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` less those whose results nothing uses (the single-sequence mask's key count)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    return kept[::-1]


@dataclass(frozen=True)
class Step:
    """One sequence's token from one :meth:`DecodeBatch.step`; `done` when it was its last."""

    sequence: int
    token: int
    done: bool


@dataclass
class _Running:
    slot: int  # its id in the graph's `sequences`, unique among the running ones
    feed: list[int]  # what the next step feeds: its prompt, then its last token
    position: int  # of feed[0]
    max_tokens: int
    stop_at_eos: bool
    output: list[int]
    draw: Sampling


class DecodeBatch:
    """Greedy generation of several sequences at once (continuous batching) on an
    :class:`~optinfer.models.runtime.IntegerModel`'s batch decode graph.

    :meth:`add` a sequence between steps; each :meth:`step` gives every running sequence its
    next token; a sequence leaves after its last one (EOS, or its max tokens) and
    :meth:`take` gives its output. The cache holds every running sequence's keys in the order
    they were computed, each with its position and slot.
    """

    def __init__(self, model):
        self.model = model
        self.session = model.session("decode_batch")
        self._out_names = [o.name for o in self.session.get_outputs()]
        self._past = empty_cache(model, self.session)
        self._key_positions = np.zeros(0, np.int64)
        self._key_slots = np.zeros(0, np.int64)
        self._running: dict[int, _Running] = {}
        self._finished: dict[int, list[int]] = {}

    def __len__(self) -> int:
        """Sequences running."""
        return len(self._running)

    def __contains__(self, sequence: int) -> bool:
        return sequence in self._running

    @property
    def cached_keys(self) -> int:
        """Keys in the cache: the running sequences' tokens so far."""
        return len(self._key_positions)

    def key_bytes(self) -> int:
        """Bytes of K/V cache one key takes (every layer's K and V)."""
        return sum(int(np.prod(np.delete(cache.shape, _key_axis(name))))
                   for name, cache in self._past.items())

    def add(self, sequence: int, prompt: list[int], max_tokens: int,
            stop_at_eos: bool = True, draw: Sampling | None = None) -> None:
        """Start `sequence` (any id not running) on `prompt`, greedy or drawn by `draw`: its
        tokens come from the next :meth:`step` on. UserError for a prompt the model cannot
        take."""
        model = self.model
        draw = model.check_draw(draw)
        if not prompt:
            raise UserError("the prompt is empty")
        model.check_tokens(prompt, "prompt")
        if max_tokens < 1:
            raise UserError(f"max tokens must be >= 1, got {max_tokens}")
        model.check_length(len(prompt) + max_tokens - 1, "prompt plus max tokens")
        if sequence in self._running:
            raise ValueError(f"sequence {sequence} is already running")
        taken = {running.slot for running in self._running.values()}
        slot = next(s for s in range(len(taken) + 1) if s not in taken)
        if slot > MAX_SEQUENCE_SLOT:
            raise ValueError(f"a batch runs at most {MAX_SEQUENCE_SLOT + 1} sequences")
        self._running[sequence] = _Running(slot, list(prompt), 0, max_tokens, stop_at_eos, [],
                                           draw)

    def step(self) -> list[Step]:
        """One decode step of every running sequence, in the order they joined."""
        if not self._running:
            return []
        running = list(self._running.items())
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows: list[int] = []
        for _, seq in running:
            tokens += seq.feed
            positions += range(seq.position, seq.position + len(seq.feed))
            slots += [seq.slot] * len(seq.feed)
            last_rows.append(len(tokens) - 1)
        new_positions = np.asarray(positions, np.int64)
        new_slots = np.asarray(slots, np.int64)
        feeds = {"tokens": np.asarray(tokens, np.int64), "positions": new_positions,
                 "sequences": new_slots, "predict_rows": np.asarray(last_rows, np.int64),
                 "past_positions": self._key_positions, "past_sequences": self._key_slots,
                 **self.model.draw_feeds([seq.draw for _, seq in running]), **self._past}
        results = self.session.run(self._out_names, feeds)
        for j in range(self.model.num_layers):
            self._past[f"past_k.{j}"] = results[1 + 2 * j]
            self._past[f"past_v.{j}"] = results[2 + 2 * j]
        self._key_positions = np.concatenate([self._key_positions, new_positions])
        self._key_slots = np.concatenate([self._key_slots, new_slots])
        steps, leaving = [], []
        for (sequence, seq), token in zip(running, results[0].tolist(), strict=True):
            seq.output.append(token)
            seq.position += len(seq.feed)
            seq.feed = [token]
            done = ((seq.stop_at_eos and token in self.model.eos_ids)
                    or len(seq.output) >= seq.max_tokens)
            steps.append(Step(sequence, token, done))
            if done:
                leaving.append(sequence)
        if leaving:
            self._leave(leaving)
        return steps

    def take(self, sequence: int) -> list[int]:
        """The output of finished `sequence` (once)."""
        return self._finished.pop(sequence)

    def _leave(self, sequences: list[int]) -> None:
        gone = [self._running[sequence].slot for sequence in sequences]
        for sequence in sequences:
            self._finished[sequence] = self._running.pop(sequence).output
        keep = ~np.isin(self._key_slots, gone)
        for name, cache in self._past.items():
            self._past[name] = np.compress(keep, cache, axis=_key_axis(name))
        self._key_positions = self._key_positions[keep]
        self._key_slots = self._key_slots[keep]


def empty_cache(model, session) -> dict[str, np.ndarray]:
    """Every layer's K/V cache with no key, as `session` (a decode graph's) takes it: 1
    plane, or 2 for 13-bit keys (16-bit linear inputs) and values (the fine graph)."""
    planes = {i.name: i.shape[1] for i in session.get_inputs()
              if i.name.startswith(("past_k.", "past_v."))}
    kv, hd = model.num_kv_heads, model.head_dim
    cache = {}
    for i in range(model.num_layers):
        cache[f"past_k.{i}"] = np.zeros((kv, planes["past_k.0"], hd, 0), np.int8)
        cache[f"past_v.{i}"] = np.zeros((kv, planes["past_v.0"], 0, hd), np.int8)
    return cache


MAX_PASS_SCORES = 1 << 24
"""Attention scores (rows x keys x heads) one :func:`predict_many` pass may hold: every layer
holds a few int32 tensors of that size at once, tens of MB."""

ROWS_PER_PASS = 192
"""Rows (claim tokens) one shared verification pass takes at most (a longer claim goes alone).
A shared pass runs the graph's nodes once and reads the weights once for all its claims, but
scores every row against every claim's keys (hidden, then masked), a waste that grows with
the square of its rows. Measured 2026-12-07 (AMD EPYC Zen 4, one thread; docs/performance.md),
time a claim: tiny-r1, claims of about 25 rows, 2.3 ms alone, 1.75 ms in passes of 100-200
rows, 3.4 ms in one of 800; R1-Distill-1.5B shape, claims of 46 rows, 0.525 s alone, 0.467 s
in passes of 2, 0.454 s of 4, 0.483 s of 8, 0.575 s of 16."""


def predict_many(model, sequences: list[np.ndarray], rows_per_pass: int = ROWS_PER_PASS
                 ) -> list[np.ndarray]:
    """The teacher-forced predictions of several claims, a few claims a pass of the batch
    graph: each sequence is the verify graph's input ``[P] ++ prompt ++ output[:-1]`` (on a
    sampling model ``[P, temperature, top_p, seed] ++ ...``; ``IntegerModel.sequence``), each
    result what ``IntegerModel.predict_sequence`` gives for it, row for row (rows are
    independent; a claim's rows see only its own keys). A pass takes claims while their rows
    stay within `rows_per_pass` (:data:`ROWS_PER_PASS`) and :data:`MAX_PASS_SCORES`. A claim
    alone runs on the batch graph too, so that a watchtower
    holds one session for its predictions, not two (each holds its own copy of the weights:
    1.58 GB at R1-Distill-1.5B shape), and it is no slower there: 0.260 s against the verify
    graph's 0.281 s for claims of 40-60 rows at that shape (median of 12, Intel Xeon with
    AMX, 2 threads, 2026-12-07)."""
    heads, header = int(model.manifest["config"]["num_heads"]), model.header_length
    results: list[np.ndarray] = []
    group: list[np.ndarray] = []
    for sequence in sequences:
        rows = sum(len(s) - header for s in group) + len(sequence) - header
        if group and (rows > rows_per_pass or rows * rows * heads > MAX_PASS_SCORES):
            results += _predict_pass(model, group)
            group = []
        group.append(np.asarray(sequence, np.int64))
    if group:
        results += _predict_pass(model, group)
    return results


def _predict_pass(model, sequences: list[np.ndarray]) -> list[np.ndarray]:
    session = model.session("decode_batch")
    tokens, positions, slots, predict, counts, draws = [], [], [], [], [], []
    first = 0  # the sequence's first row
    header = model.header_length
    for slot, sequence in enumerate(sequences):
        prompt_len, body = int(sequence[0]), sequence[header:]
        if model.samples:  # the claim's parameters, for each of its predicted rows
            draws.append(np.repeat(sequence[1:header].reshape(1, -1), len(body) - prompt_len + 1,
                                   axis=0))
        tokens.append(body)
        positions.append(np.arange(len(body), dtype=np.int64))
        slots.append(np.full(len(body), slot, np.int64))
        predict.append(np.arange(first + prompt_len - 1, first + len(body), dtype=np.int64))
        counts.append(len(body) - prompt_len + 1)
        first += len(body)
    feeds = {"tokens": np.concatenate(tokens), "positions": np.concatenate(positions),
             "sequences": np.concatenate(slots), "predict_rows": np.concatenate(predict),
             "past_positions": np.zeros(0, np.int64), "past_sequences": np.zeros(0, np.int64),
             **empty_cache(model, session)}
    if draws:  # temperature, top-p and seed columns, (rows, 1) each
        columns = np.concatenate(draws)
        feeds.update({name: columns[:, [i]] for i, name in enumerate(PARAMETERS)})
    (predicted,) = session.run(["next_tokens"], feeds)
    return np.split(predicted, np.cumsum(counts)[:-1])


def _key_axis(cache_name: str) -> int:
    """The key axis of a cache: K is (kv, planes, hd, keys), V (kv, planes, keys, hd)."""
    return 3 if cache_name.startswith("past_k") else 2


def generate_batched(model, jobs: list[tuple[list[int], int]], max_batch: int,
                     stop_at_eos: bool = True, draws: list[Sampling] | None = None
                     ) -> list[list[int]]:
    """Every job's (prompt, max tokens) output, greedy or drawn by its `draws` entry, run
    `max_batch` at a time: a job joins as soon as another leaves (tests and benchmarks)."""
    if max_batch < 1:
        raise UserError(f"the batch size must be >= 1, got {max_batch}")
    batch = DecodeBatch(model)
    outputs: dict[int, list[int]] = {}
    waiting = list(enumerate(jobs))[::-1]
    while waiting or len(batch):
        while waiting and len(batch) < max_batch:
            index, (prompt, max_tokens) = waiting.pop()
            batch.add(index, prompt, max_tokens, stop_at_eos, draws and draws[index])
        for step in batch.step():
            if step.done:
                outputs[step.sequence] = batch.take(step.sequence)
    return [outputs[i] for i in range(len(jobs))]
