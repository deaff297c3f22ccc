"""The one-step spec: openings and recomputed elements equal the trace, proofs bind everything.

Real traces: the committed tiny-r1 on a generated answer (every node, first/last/random
elements), and a small random model whose vocabulary is large enough for the two-level argmax
tree (GatherElements). Synthetic nodes: every op against the numpy reference on random inputs,
with the edge cases (broadcast (T,1) operands, negative steps, negative indices, batch
broadcasting, ties, truncating division, wrap-around).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from optinfer.models import opset
from optinfer.models.manifest import node_description
from optinfer.models.qwen2_graph import argmax_chunk
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR, held_out_problems
from optinfer.prover.commitments import ProofError, RangeProof, dtype_code
from optinfer.prover.one_step import WrongClaim
from optinfer.prover.one_step_element import (
    COLUMNS,
    Opening,
    TensorRef,
    element_dependencies,
    element_from_inputs,
    expected_output,
    parameter_values,
    parse_node_description,
)
from optinfer.prover.one_step_prover import (
    CommittedModel,
    OneStepProver,
    TraceCommitment,
    one_step_witness,
)
from tests.profiles import examples

# ----------------------------------------------------------------------------- real traces


@pytest.fixture(scope="module")
def tiny():
    """The committed tiny-r1, a generated answer, and a prover over its trace."""
    model = IntegerModel(INTEGER_DIR)
    prompt = model.encode(held_out_problems(1, seed=3)[0].prompt)
    output = model.generate(prompt, 48)
    sequence, outputs = model.trace(prompt, output)
    prover = OneStepProver(CommittedModel(model), TraceCommitment(sequence, outputs))
    names = [node.name for node in model.verify_graph().graph.node]
    return model, prompt, output, outputs, prover, names


def _elements(count: int, rng: random.Random) -> set[int]:
    return {0, count - 1, rng.randrange(count), rng.randrange(count)}


def test_every_node_of_tiny_r1_recomputes_from_its_witness(tiny):
    _, _, _, outputs, prover, names = tiny
    rng = random.Random(5)
    ops = set()
    for k, tensor in enumerate(outputs, start=1):
        for index in _elements(tensor.size, rng):
            witness = prover.witness(k, index)
            value = int(tensor.ravel()[index])
            assert witness.claimed == value
            assert prover.check(witness) == value, (k, names[k - 1], index)
            ops.add(witness.node.op_type)
    assert ops == set(opset.OP_ORDER)


def test_one_step_witness_builds_everything_from_the_model(tiny):
    model, prompt, output, outputs, prover, names = tiny
    k = names.index("L0.attn.scores") + 1
    witness = one_step_witness(model, prompt, output, k, 7)
    assert witness == prover.witness(k, 7)
    assert prover.check(witness) == int(outputs[k - 1].ravel()[7])


def _node_k(names: list[str], name: str) -> int:
    return names.index(name) + 1


def test_matrix_products_open_a_row_of_a_and_a_row_of_the_column_source(tiny):
    _, _, _, outputs, prover, names = tiny
    for name in ("L0.attn.q.acc", "L0.attn.scores", "L0.attn.pv", "lm_head.acc"):
        k = _node_k(names, name)
        witness = prover.witness(k, outputs[k - 1].size - 1)
        node = witness.node
        zero_point, a, columns = (r.opening for r in witness.ranges)
        assert zero_point.count == 1 and zero_point.input_position == 2
        assert a.tensor_ref == node.inputs[0] and columns.layout == COLUMNS
        assert columns.tensor_ref == node.column_source
        # A constant B is its own (transposed) column source; K and V use proof-only leaves.
        assert (node.column_source == node.inputs[1]) == (name.endswith(".acc"))
        k_dim = prover._tree(node.inputs[0]).array.shape[-1]
        assert a.count == columns.count == k_dim  # K bytes each


def test_broadcast_operands_of_shape_t_by_1_read_their_row(tiny):
    _, _, _, outputs, prover, names = tiny
    k = _node_k(names, "L0.attn_norm.y")  # (T, H) / (T, 1)
    shape = outputs[k - 1].shape
    index = 3 * shape[1] + 5
    witness = prover.witness(k, index)
    numerator, divisor = (r.opening for r in witness.ranges)
    assert (numerator.start_element, divisor.start_element) == (index, 3)
    assert prover.check(witness) == int(outputs[k - 1].ravel()[index])


def test_slice_with_the_dynamic_start_opens_the_start_leaf(tiny):
    _, prompt, _, outputs, prover, names = tiny
    k = _node_k(names, "final.rows")
    witness = prover.witness(k, 0)
    start = witness.ranges[0].opening
    assert start.tensor_ref == TensorRef(0, _node_k(names, "start"))  # a state leaf
    data = witness.ranges[-1].opening
    assert data.start_element == (len(prompt) - 1) * outputs[k - 1].shape[1]
    assert prover.check(witness) == int(outputs[k - 1].ravel()[0])


def test_gather_on_tables_opens_the_index_then_the_entry(tiny):
    _, _, _, outputs, prover, names = tiny
    for name in ("L0.attn.exp.values", "L0.mlp.silu.values", "embed.rows", "rope.cos"):
        k = _node_k(names, name)
        witness = prover.witness(k, outputs[k - 1].size - 1)
        index, entry = (r.opening for r in witness.ranges)
        assert (index.input_position, entry.input_position) == (1, 0)
        assert entry.tensor_ref.kind == 1  # the table is a constant
        assert prover.check(witness) == int(outputs[k - 1].ravel()[-1])


def test_shape_opens_no_element_and_range_its_three_scalars(tiny):
    _, _, _, outputs, prover, names = tiny
    shape = prover.witness(_node_k(names, "length.1d"), 0)
    assert shape.ranges == () and len(shape.tensors) == 1
    k = _node_k(names, "positions")
    positions = prover.witness(k, outputs[k - 1].size - 1)
    assert [r.opening.count for r in positions.ranges] == [1, 1, 1]
    assert prover.check(positions) == outputs[k - 1].size - 1


@pytest.fixture(scope="module")
def argmax_tree_model(tmp_path_factory):
    """A one-layer random model whose 8192-token vocabulary needs the two-level argmax."""
    from optinfer.models.checkpoint import write_random_checkpoint
    from optinfer.models.converter import convert

    root = tmp_path_factory.mktemp("v8k")
    write_random_checkpoint(root / "ckpt", preset="tiny", seed=3, vocab_size=8192, num_layers=1)
    convert(root / "ckpt", root / "int", max_context=16)
    model = IntegerModel(root / "int")
    prompt = [5, 900, 8000]
    output = model.generate(prompt, 4, stop_at_eos=False)
    sequence, outputs = model.trace(prompt, output)
    prover = OneStepProver(CommittedModel(model), TraceCommitment(sequence, outputs))
    return outputs, prover, [node.name for node in model.verify_graph().graph.node]


def test_the_argmax_tree_recomputes_node_by_node(argmax_tree_model):
    outputs, prover, names = argmax_tree_model
    for name in ("argmax.chunks", "argmax.local", "argmax.chunkmax", "argmax.chunk",
                 "argmax.within", "argmax.index", "next_tokens"):
        k = _node_k(names, name)
        for index in range(outputs[k - 1].size):
            witness = prover.witness(k, index)
            assert prover.check(witness) == int(outputs[k - 1].ravel()[index]), name
    within = prover.witness(_node_k(names, "argmax.within"), 0)
    assert within.node.op_type == "GatherElements"
    local = prover.witness(_node_k(names, "argmax.local"), 1)
    assert [r.opening.count for r in local.ranges] == [argmax_chunk(8192)]  # one chunk row


# ----------------------------------------------------------------------------- rejections


@pytest.fixture(scope="module")
def scores_witness(tiny):
    _, _, _, outputs, prover, names = tiny
    k = _node_k(names, "L1.attn.scores")
    return prover, prover.witness(k, 11), int(outputs[k - 1].ravel()[11])


def _flip_byte(proof: RangeProof, offset: int) -> RangeProof:
    chunks = bytearray(proof.chunks)
    chunks[offset] ^= 1
    return dataclasses.replace(proof, chunks=bytes(chunks))


def test_a_tampered_opened_byte_is_rejected(scores_witness):
    prover, witness, _ = scores_witness
    for position in range(len(witness.ranges)):
        opened = witness.ranges[position]
        # uint8 zero point, uint8 A row, int8 column source row: one byte per element.
        offset = opened.opening.start_element % 1024
        ranges = list(witness.ranges)
        ranges[position] = dataclasses.replace(opened, proof=_flip_byte(opened.proof, offset))
        with pytest.raises(ProofError):
            prover.check(dataclasses.replace(witness, ranges=tuple(ranges)))


def test_a_wrong_leaf_is_rejected(tiny, scores_witness):
    prover, witness, _ = scores_witness
    # The real tensor of another leaf, with its own valid root and state path.
    source = witness.tensors[0]
    other = prover._opened_tensor(source.position, source.layout,
                                  TensorRef(0, source.ref.index - 1), witness.k)
    with pytest.raises(ProofError, match="input 0"):
        prover.check(dataclasses.replace(witness, tensors=(other, *witness.tensors[1:])))
    # The right leaf index but another tensor's root.
    forged = dataclasses.replace(source, root=other.root, data_root=other.data_root,
                                 shape=other.shape, dtype=other.dtype)
    with pytest.raises(ProofError):
        prover.check(dataclasses.replace(witness, tensors=(forged, *witness.tensors[1:])))
    # Another node's description.
    with pytest.raises(ProofError, match="description"):
        prover.check(dataclasses.replace(witness, description=prover.committed.descriptions[0]))


def test_a_wrong_opening_is_rejected(scores_witness):
    prover, witness, _ = scores_witness
    first = witness.ranges[0]
    moved = dataclasses.replace(first.opening, start_element=first.opening.start_element + 1)
    ranges = (dataclasses.replace(first, opening=moved), *witness.ranges[1:])
    with pytest.raises(ProofError, match="expected the opening"):
        prover.check(dataclasses.replace(witness, ranges=ranges))
    with pytest.raises(ProofError, match="more than"):
        prover.check(dataclasses.replace(witness, ranges=(*witness.ranges, first)))


def test_missing_extra_or_out_of_range_parts_are_rejected(scores_witness):
    prover, witness, _ = scores_witness
    with pytest.raises(ProofError, match="opened tensors"):
        prover.check(dataclasses.replace(witness, tensors=witness.tensors[1:]))
    with pytest.raises(ProofError, match="opened tensors"):
        prover.check(dataclasses.replace(witness, tensors=(*witness.tensors, witness.tensors[0])))
    with pytest.raises(ProofError, match="outside"):
        prover.check(dataclasses.replace(witness, out_index=10**9))
    with pytest.raises(ProofError, match="expected the opening"):
        prover.check(dataclasses.replace(witness, ranges=witness.ranges[:-1]))


def test_a_claimed_value_that_is_not_the_committed_element_is_rejected(scores_witness):
    prover, witness, value = scores_witness
    with pytest.raises(ProofError, match="claimed value"):
        prover.check(dataclasses.replace(witness, claimed=value + 1))


def test_a_provider_that_committed_a_wrong_element_loses(tiny):
    _, _, _, outputs, prover, names = tiny
    for name in ("L0.attn.scores", "L0.mlp.silu.values", "final.rows", "next_tokens"):
        k = _node_k(names, name)
        lie = outputs[k - 1].copy()
        lie.ravel()[-1] += 1
        provider = prover.trace.with_output(k, lie)
        witness = prover.witness(k, lie.size - 1, provider=provider)
        with pytest.raises(WrongClaim) as caught:
            prover.check(witness, provider=provider)
        assert caught.value.recomputed == int(outputs[k - 1].ravel()[-1])
        # Any other element of the lying tensor still recomputes: the challenger must pick.
        assert prover.check(prover.witness(k, 0, provider=provider), provider=provider) \
            == int(outputs[k - 1].ravel()[0])


def test_a_provider_tensor_of_the_wrong_shape_loses(tiny):
    _, _, _, outputs, prover, names = tiny
    k = _node_k(names, "tokens")
    shorter = outputs[k - 1][:-1].copy()
    provider = prover.trace.with_output(k, shorter)
    with pytest.raises(WrongClaim, match="outputs"):
        prover.check(prover.witness(k, 0, provider=provider), provider=provider)


def test_malformed_descriptions_are_rejected(tiny):
    description = tiny[4].committed.descriptions[0]
    with pytest.raises(ProofError, match="trailing"):
        parse_node_description(description + b"\0")
    with pytest.raises(ProofError, match="truncated"):
        parse_node_description(description[:-1])
    with pytest.raises(ProofError, match="op code"):
        parse_node_description(b"\0\x63" + description[2:])
    # ArgMax (op code of OP_ORDER) with no input and an `axis` attribute holding no value.
    from optinfer.models.opset import OP_ORDER

    argmax = (OP_ORDER.index("ArgMax") + 1).to_bytes(2, "big")
    with pytest.raises(ProofError, match="without a value"):
        parse_node_description(argmax + b"\0" + b"\x01" + b"\x01\x00")


# ----------------------------------------------------------------------------- every op


def _step_node(op: str, n_inputs: int, **attributes):
    names = [f"x{p}" for p in range(n_inputs)]
    leaf_of = {name: p for p, name in enumerate(names)} | {"columns": n_inputs}
    node = helper.make_node(op, names, ["y"], **attributes)
    source = "columns" if op == "MatMulInteger" else None
    return parse_node_description(node_description(node, leaf_of, {}, source))


def _check_every_element(op: str, inputs: list[np.ndarray], **attributes) -> np.ndarray:
    node = _step_node(op, len(inputs), **attributes)
    expected = opset.OPS[op].function(*inputs, **attributes)
    shapes = [x.shape for x in inputs]
    parameters = parameter_values(node, shapes, {p: x.ravel() for p, x in enumerate(inputs)})
    signature = expected_output(node, shapes, [dtype_code(x.dtype) for x in inputs], parameters)
    assert signature == (dtype_code(expected.dtype), expected.shape)
    got = [element_from_inputs(node, inputs, i) for i in range(expected.size)]
    np.testing.assert_array_equal(np.array(got).reshape(expected.shape),
                                  expected.astype(np.int64))
    return expected


RNG = np.random.default_rng(11)


def _ints(shape, low=-1000, high=1000, dtype=np.int64):
    return RNG.integers(low, high, size=shape).astype(dtype)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Min", "Max", "Greater"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 1)), ((2, 1, 4), (3, 1)), ((4,), ())])
def test_elementwise_ops_broadcast(op, shapes):
    a, b = _ints(shapes[0]), _ints(shapes[1], 1, 50) * np.int64(-1) ** _ints(shapes[1], 0, 2)
    _check_every_element(op, [a, b])


def test_arithmetic_edge_cases():
    big = np.array([2**31 - 1, -(2**31), -7, 7], np.int32)
    _check_every_element("Add", [big, np.array([1, -1, 0, 0], np.int32)])  # wraps
    _check_every_element("Mul", [big, np.array([2, 2, 3, 3], np.int32)])
    _check_every_element("Div", [np.array([-7, 7, -7, 7], np.int32),
                                 np.array([2, -2, -2, 2], np.int32)])  # truncates
    x = _ints((5, 3))
    _check_every_element("Clip", [x, np.array(-100, np.int64), np.array(100, np.int64)])
    _check_every_element("Clip", [x, np.array(100, np.int64), np.array(-100, np.int64)])


@pytest.mark.parametrize("to", [TensorProto.UINT8, TensorProto.INT8, TensorProto.BOOL,
                                TensorProto.INT32, TensorProto.INT64])
def test_cast_wraps(to):
    _check_every_element("Cast", [np.array([300, -1, 0, 2**40 + 5, -129], np.int64)], to=to)


def test_reductions_and_argmax_with_ties():
    x = _ints((2, 3, 5), -3, 3)
    _check_every_element("ReduceSum", [x, np.array([-1], np.int64)], keepdims=1)
    _check_every_element("ReduceSum", [x, np.array([0, 2], np.int64)], keepdims=0)
    _check_every_element("ReduceMax", [x, np.array([1], np.int64)], keepdims=1)
    _check_every_element("ReduceMax", [x, np.array([], np.int64)], keepdims=0)
    _check_every_element("ArgMax", [x], axis=-1, keepdims=1)  # ties: the first index
    _check_every_element("ArgMax", [x], axis=1, keepdims=0)
    node = _step_node("ReduceSum", 2, keepdims=0)
    runs = element_dependencies(node, 1, [(2, 3, 5), (2,)], (3,),
                                {1: np.array([0, 2], np.int64)})
    assert [(o.start_element, o.count) for o in runs[1:]] == [(5, 5), (20, 5)]


def test_indexing_with_negative_indices():
    table = _ints((7, 3))
    _check_every_element("Gather", [table, np.array([[0, -1], [6, -7]], np.int64)], axis=0)
    _check_every_element("Gather", [table, np.array([2, -3], np.int64)], axis=1)
    _check_every_element("Gather", [table, np.array(-2, np.int64)], axis=0)
    local = _ints((3, 4), 0, 100)
    _check_every_element("GatherElements", [local, np.array([[1], [-1], [0]], np.int64)],
                         axis=1)
    with pytest.raises(opset.OpSemanticsError):
        element_from_inputs(_step_node("Gather", 2, axis=0), [table, np.array([7])], 0)


def test_indexing_with_int32_indices():
    # Op-set version 2 takes int32 indices (the model's table lookups); parameters stay int64.
    table = _ints((7, 3))
    _check_every_element("Gather", [table, np.array([[0, -1], [6, -7]], np.int32)], axis=0)
    _check_every_element("GatherElements", [_ints((3, 4)), np.array([[1], [-1], [0]], np.int32)],
                         axis=1)
    i32, i8 = dtype_code(np.dtype(np.int32)), dtype_code(np.dtype(np.int8))
    gather, shapes = _step_node("Gather", 2, axis=0), [(7, 3), (2,)]
    assert expected_output(gather, shapes, [i32, i32], {}) == (i32, (2, 3))
    with pytest.raises(opset.OpSemanticsError, match="int32 or int64"):
        expected_output(gather, shapes, [i32, i8], {})
    with pytest.raises(opset.OpSemanticsError, match="must be int64"):
        expected_output(_step_node("Reshape", 2), shapes, [i32, i32], {1: np.array([3, 7])})


def test_data_movement():
    x = _ints((2, 3, 4))
    _check_every_element("Reshape", [x, np.array([0, -1], np.int64)])
    _check_every_element("Reshape", [np.array([5], np.int64), np.array([], np.int64)])
    _check_every_element("Transpose", [x], perm=[2, 0, 1])
    _check_every_element("Transpose", [x])
    _check_every_element("Concat", [x, _ints((2, 1, 4)), _ints((2, 2, 4))], axis=1)
    _check_every_element("Concat", [x, x], axis=-1)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    _check_every_element("Slice", [x, i64(1), i64(2**63 - 1), i64(0)])
    _check_every_element("Slice", [x, i64(-1, 3), i64(-(2**63), 0), i64(2, 1), i64(-2, -1)])
    _check_every_element("Slice", [x, i64(-100, 1), i64(100, -1)])
    _check_every_element("Shape", [x])
    _check_every_element("Range", [i64(3), i64(-8), i64(-3)])
    _check_every_element("Range", [np.array(0, np.int64), np.array(5, np.int64),
                                   np.array(1, np.int64)])


@pytest.mark.parametrize("shapes", [((4, 6), (6, 5)), ((2, 3, 4, 6), (2, 1, 6, 5)),
                                    ((6,), (6, 5)), ((3, 4, 6), (6, 2))])
def test_matmul_integer_batch_broadcasting(shapes):
    a = RNG.integers(0, 256, size=shapes[0]).astype(np.uint8)
    b = RNG.integers(-64, 64, size=shapes[1]).astype(np.int8)
    _check_every_element("MatMulInteger", [a, b, np.array(128, np.uint8)])
    node = _step_node("MatMulInteger", 3)
    out_shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), *a.shape[-2:-1], b.shape[-1])
    assert element_dependencies(node, 0, [a.shape, b.shape, ()], out_shape) == [
        Opening(2, TensorRef(0, 2), 0, 1)]  # the zero point first
    last = int(np.prod(out_shape)) - 1
    openings = element_dependencies(node, last, [a.shape, b.shape, ()], out_shape,
                                    {2: np.array([128], np.uint8)})
    k_dim = a.shape[-1]
    # The last row of A (its last batch, or batch 0 where A's batch axis has size 1) ...
    assert openings[1] == Opening(0, TensorRef(0, 0), a.size - k_dim, k_dim)
    # ... and the last row of the column source, i.e. the last column of B.
    assert openings[2] == Opening(1, TensorRef(0, 3), b.size - k_dim, k_dim, COLUMNS)


def test_matmul_integer_reads_batch_zero_of_a_broadcast_operand():
    node = _step_node("MatMulInteger", 3)
    # A (2, 3, 4, 6) x B (2, 1, 6, 5): element at batch (1, 2), row 3, column 4.
    out_index = np.ravel_multi_index((1, 2, 3, 4), (2, 3, 4, 5))
    openings = element_dependencies(node, int(out_index), [(2, 3, 4, 6), (2, 1, 6, 5), ()],
                                    (2, 3, 4, 5), {2: np.array([128], np.uint8)})
    a_row = np.ravel_multi_index((1, 2, 3, 0), (2, 3, 4, 6))
    column = np.ravel_multi_index((1, 0, 4, 0), (2, 1, 5, 6))  # B's batch axis 1 has size 1
    assert [(o.start_element, o.count) for o in openings[1:]] == [(a_row, 6), (column, 6)]


@given(data=st.data())
@settings(max_examples=examples(60), deadline=None)
def test_slice_clamping_matches_the_reference_on_random_parameters(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    axes = data.draw(st.permutations(range(len(shape))))[: data.draw(
        st.integers(1, len(shape)))]
    bound = st.integers(-7, 7) | st.sampled_from([-(2**63), 2**63 - 1])
    starts = [data.draw(bound) for _ in axes]
    steps = [data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    ends = [data.draw(st.integers(-7, 7) | st.sampled_from([-(2**63)])) if step < 0
            else data.draw(bound) for step in steps]
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    _check_every_element("Slice", [x, i64(starts), i64(ends), i64(axes), i64(steps)])


@given(data=st.data())
@settings(max_examples=examples(60), deadline=None)
def test_broadcasting_matches_the_reference_on_random_shapes(data):
    out = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    shapes = []
    for _ in range(2):
        rank = data.draw(st.integers(0, len(out)))
        shapes.append(tuple(d if data.draw(st.booleans()) else 1 for d in out[len(out) - rank:]))
    op = data.draw(st.sampled_from(["Add", "Sub", "Mul", "Min", "Greater"]))
    # The values from a drawn seed, not the module's RNG, whose state depends on which tests
    # ran before: the same example must get the same values in every run.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    a, b = (rng.integers(-1000, 1000, size=shape).astype(np.int32) for shape in shapes)
    _check_every_element(op, [a, b])
