"""OneStepVerifier.sol against the reference `optinfer.prover.one_step.check_witness`, on anvil.

Every verdict is compared with the reference's on the same witness: False where it returns
the value (the challenger loses), True where it raises WrongClaim (the provider loses: a wrong
element, a wrong output dtype or shape, an op-set refusal on the agreed inputs), a revert
named after the broken rule where it raises ProofError (a malformed witness).

Synthetic one-node models (`OneNodeModel`) cover every op with its edge cases (broadcasting,
wrap-around, truncating division, Cast's low bits and bool, ArgMax ties, negative Gather
indices, negative Slice steps, Range, batch-broadcast MatMulInteger, weights as constants) and
the refusals; the committed tiny-r1 covers every op type of a real verify graph, honest and
lying, and gives the gas per op type. The verifier is stateless: deployed once per module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.one_step_binding import (
    OneStepVerifier,
    context,
    encode_witness,
    one_step_gas,
    prover_context,
)
from optinfer.models import opset
from optinfer.models.manifest import committed_constant, node_description
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR, held_out_problems
from optinfer.prover import commitments
from optinfer.prover.commitments import STATE_DEPTH, ZERO_HASHES, ProofError, TensorTree
from optinfer.prover.game import ModelTrace
from optinfer.prover.one_step import Witness, WrongClaim, check_witness
from optinfer.prover.one_step_prover import CommittedModel, OneStepProver, TraceCommitment
from tests.profiles import examples

#: The one-step budget at the R1-Distill-1.5B shape (issue 17's per-op cap; docs/performance.md).
GAS_TARGET = 1_500_000


@pytest.fixture(scope="module")
def verifier(chain, w3) -> OneStepVerifier:
    return OneStepVerifier.deploy(w3, chain.accounts[0])


# ------------------------------------------------------------------------------------------------
# One-node models and verdicts
# ------------------------------------------------------------------------------------------------


class OneNodeModel:
    """One node (node k) over given inputs, committed as a converted model would be.

    Leaf 0 is a placeholder sequence; each input is a state leaf 1.. or, at `constants`, a
    constant (a MatMulInteger B constant committed transposed, its own column source); a B
    leaf gets a proof-only column-source leaf. The description is the only non-empty leaf of
    the nodes tree. `output` (default: the op set's result) is node k's tensor. Offers what
    OneStepProver reads of a CommittedModel.
    """

    def __init__(self, op: str, inputs: list, constants=(), output=None,
                 description: bytes | None = None, **attributes):
        leaves = [np.zeros(1, np.int64)]
        leaf_of, constant_of, self.constants, names = {}, {}, [], []
        for p, x in enumerate(inputs):
            names.append("" if x is None else f"x{p}")
            if x is None:
                continue
            if p in constants:
                constant_of[f"x{p}"] = len(self.constants)
                self.constants.append(committed_constant(x, op == "MatMulInteger" and p == 1))
            else:
                leaf_of[f"x{p}"] = len(leaves)
                leaves.append(x)
        source = None
        if op == "MatMulInteger":
            source = "x1" if 1 in constants else "columns"
            if source == "columns":
                leaf_of["columns"] = len(leaves)
                leaves.append(np.ascontiguousarray(np.swapaxes(inputs[1], -1, -2)))
        node = helper.make_node(op, names, ["y"], **attributes)
        self.description = description or node_description(node, leaf_of, constant_of, source)
        self.k = self.node_count = len(leaves)
        if output is None:
            output = opset.OPS[op].function(*inputs, **attributes)
        self.output = np.asarray(output)
        self.trace = TraceCommitment(leaves[0], [*leaves[1:], self.output])
        self.descriptions = [b""] * (self.k - 1) + [self.description]
        self.nodes_root = commitments.root_from_path(
            hashlib.sha256(self.description).digest(), self.k, ZERO_HASHES[:STATE_DEPTH])
        self._trees = [TensorTree(c) for c in self.constants]
        self._constant_levels = commitments.tree_levels(
            [t.root for t in self._trees] or [commitments.ZERO])
        self.prover = OneStepProver(self, self.trace)

    @property
    def constants_root(self) -> bytes:
        return self._constant_levels[-1][0]

    def description_path(self, k: int) -> tuple[bytes, ...]:
        return tuple(ZERO_HASHES[:STATE_DEPTH])

    def constant_path(self, c: int) -> tuple[bytes, ...]:
        return tuple(level[(c >> h) ^ 1] for h, level in enumerate(self._constant_levels[:-1]))

    def constant_tree(self, c: int) -> TensorTree:
        return self._trees[c]

    def lying(self, tensor: np.ndarray) -> TraceCommitment:
        """The provider's trace with `tensor` as node k's output."""
        return self.trace.with_output(self.k, np.asarray(tensor))


def reference_verdict(prover: OneStepProver, witness, provider=None) -> bool | str:
    """check_witness's verdict: False (value right), True (WrongClaim), or "ProofError"."""
    try:
        prover.check(witness, provider=provider)
    except WrongClaim:
        return True
    except ProofError:
        return "ProofError"
    return False


def chain_verdict(verifier: OneStepVerifier, prover: OneStepProver, witness, provider=None,
                  ctx: tuple | None = None) -> bool | str:
    """providerWrong's verdict, or the name of the custom error it reverted with."""
    ctx = ctx or prover_context(prover, witness, provider)
    try:
        return verifier.provider_wrong(ctx, witness)
    except ContractRevert as revert:
        return revert.name


def with_flipped(tensor: np.ndarray, index: int) -> np.ndarray:
    """A copy of `tensor` with element `index` changed (lowest bit flipped, bool negated)."""
    lie = np.array(tensor, copy=True)
    flat = lie.reshape(-1)
    flat[index] = ~flat[index] if lie.dtype == bool else flat[index] ^ 1
    return lie


def sample_elements(count: int, rng: random.Random, most: int = 4) -> list[int]:
    return sorted({0, count - 1, *(rng.randrange(count) for _ in range(most - 2))})


def assert_agrees(verifier: OneStepVerifier, model: OneNodeModel, seed: int = 0) -> None:
    """On sampled elements: the honest element verifies (False) and a flipped one loses
    (True), on chain exactly as in the reference."""
    rng = random.Random(seed)
    for index in sample_elements(model.output.size, rng):
        witness = model.prover.witness(model.k, index)
        assert reference_verdict(model.prover, witness) is False
        assert chain_verdict(verifier, model.prover, witness) is False, index
        provider = model.lying(with_flipped(model.output, index))
        witness = model.prover.witness(model.k, index, provider=provider)
        assert reference_verdict(model.prover, witness, provider) is True
        assert chain_verdict(verifier, model.prover, witness, provider) is True, index


RNG = np.random.default_rng(23)


def ints(shape, low=-1000, high=1000, dtype=np.int64) -> np.ndarray:
    return RNG.integers(low, high, size=shape).astype(dtype)


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


# ------------------------------------------------------------------------------------------------
# Every op, honest and lying, with edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Min", "Max", "Greater"])
def test_providerWrong_elementwiseBroadcast_matchesReference(verifier, op):
    divisor = ints((3, 1), 1, 50) * np.int64(-1) ** ints((3, 1), 0, 2)
    assert_agrees(verifier, OneNodeModel(op, [ints((3, 4)), divisor]))
    b = ints((3, 1), 1, 50, np.int32)
    assert_agrees(verifier, OneNodeModel(op, [ints((2, 1, 4), dtype=np.int32), b]), seed=1)


def test_providerWrong_int32AndInt64Wrap_matchesReference(verifier):
    big32 = np.array([2**31 - 1, -(2**31), -7, 7], np.int32)
    assert_agrees(verifier, OneNodeModel("Add", [big32, np.array([1, -1, 0, 0], np.int32)]))
    assert_agrees(verifier, OneNodeModel("Mul", [big32, np.array([2, 2, 3, 3], np.int32)]))
    big64 = i64(2**63 - 1, -(2**63), 3 * 2**61, -5)
    assert_agrees(verifier, OneNodeModel("Mul", [big64, i64(2, 2, 7, 3)]))
    assert_agrees(verifier, OneNodeModel("Sub", [big64, i64(-1, 1, -(2**62), 0)]))


def test_providerWrong_divisionOfNegatives_truncatesTowardZero(verifier):
    model = OneNodeModel("Div", [np.array([-7, 7, -7, 7], np.int32),
                                 np.array([2, -2, -2, 2], np.int32)])
    np.testing.assert_array_equal(model.output, [-3, -3, 3, 3])
    assert_agrees(verifier, model)


def test_providerWrong_clip_matchesReference(verifier):
    x = ints((5, 3))
    assert_agrees(verifier, OneNodeModel("Clip", [x, np.array(-100, np.int64),
                                                  np.array(100, np.int64)]))
    # min > max gives max everywhere; an absent min is no bound.
    assert_agrees(verifier, OneNodeModel("Clip", [x, np.array(100, np.int64),
                                                  np.array(-100, np.int64)]))
    assert_agrees(verifier, OneNodeModel("Clip", [x, None, np.array(5, np.int64)]))


@pytest.mark.parametrize("to", [TensorProto.UINT8, TensorProto.INT8, TensorProto.BOOL,
                                TensorProto.INT32, TensorProto.INT64])
def test_providerWrong_castWrapsAndToBool_matchesReference(verifier, to):
    values = i64(300, -1, 0, 2**40 + 5, -129, 2**31)
    assert_agrees(verifier, OneNodeModel("Cast", [values], to=to))


def test_providerWrong_castFromBoolAndInt8_matchesReference(verifier):
    assert_agrees(verifier, OneNodeModel("Cast", [np.array([True, False, True])],
                                         to=TensorProto.INT32))
    assert_agrees(verifier, OneNodeModel("Cast", [np.array([-128, 127, -1], np.int8)],
                                         to=TensorProto.UINT8))


def test_providerWrong_reductions_matchReference(verifier):
    x = ints((2, 3, 5), -3, 3)
    assert_agrees(verifier, OneNodeModel("ReduceSum", [x, i64(-1)], keepdims=1))
    # Axes 0 and 2 of (2, 3, 5): two runs of 5 elements per output element.
    assert_agrees(verifier, OneNodeModel("ReduceSum", [x, i64(0, 2)], keepdims=0))
    assert_agrees(verifier, OneNodeModel("ReduceMax", [x.astype(np.int32), i64(1)], keepdims=1))
    assert_agrees(verifier, OneNodeModel("ReduceMax", [x, np.zeros(0, np.int64)], keepdims=0))


def test_providerWrong_argMaxTies_firstIndex(verifier):
    x = ints((2, 3, 5), -2, 2)  # many ties
    model = OneNodeModel("ArgMax", [x], axis=-1, keepdims=1)
    np.testing.assert_array_equal(model.output[..., 0], np.argmax(x, axis=-1))
    assert_agrees(verifier, model)
    assert_agrees(verifier, OneNodeModel("ArgMax", [x.astype(np.int32)], axis=1, keepdims=0))


def test_providerWrong_gatherNegativeIndices_matchesReference(verifier):
    table = ints((7, 3))
    assert_agrees(verifier, OneNodeModel("Gather", [table, i64([0, -1], [6, -7])], axis=0))
    assert_agrees(verifier, OneNodeModel("Gather", [table, i64(2, -3)], axis=1))
    assert_agrees(verifier, OneNodeModel("Gather", [table, np.array(-2, np.int64)], axis=0))
    # Weights-like tables are constants; bool and int8 data decode per their dtype.
    flags = RNG.integers(0, 2, size=(4, 3)).astype(bool)
    assert_agrees(verifier, OneNodeModel("Gather", [flags, i64(3, -4, 1)], constants=(0,)))
    small = ints((5, 2), -128, 128, np.int8)
    assert_agrees(verifier, OneNodeModel("Gather", [small, i64(-1, 0)], constants=(0,)))
    local = ints((3, 4), 0, 100)
    assert_agrees(verifier, OneNodeModel("GatherElements", [local, i64([1], [-1], [0])],
                                         axis=1))


def test_providerWrong_int32Indices_matchReference(verifier):
    # Op-set version 2: the model's table lookups index with int32, negatives included.
    table = ints((7, 3))
    indices = np.array([[0, -1], [6, -7]], np.int32)
    assert_agrees(verifier, OneNodeModel("Gather", [table, indices], constants=(0,), axis=0))
    local = ints((3, 4), 0, 100)
    assert_agrees(verifier, OneNodeModel("GatherElements",
                                         [local, np.array([[1], [-1], [0]], np.int32)], axis=1))


def test_providerWrong_dataMovement_matchesReference(verifier):
    x = ints((2, 3, 4))
    assert_agrees(verifier, OneNodeModel("Reshape", [x, i64(0, -1)]))
    assert_agrees(verifier, OneNodeModel("Reshape", [i64(5), np.zeros(0, np.int64)]))
    assert_agrees(verifier, OneNodeModel("Transpose", [x], perm=[2, 0, 1]))
    assert_agrees(verifier, OneNodeModel("Transpose", [ints((3, 4), -128, 128, np.int8)]))
    assert_agrees(verifier, OneNodeModel("Concat", [x, ints((2, 1, 4)), ints((2, 2, 4))],
                                         axis=1))
    assert_agrees(verifier, OneNodeModel("Shape", [x]))


def test_providerWrong_sliceWithNegativeSteps_matchesReference(verifier):
    x = ints((2, 3, 4), dtype=np.int32)
    assert_agrees(verifier, OneNodeModel("Slice", [x, i64(1), i64(2**63 - 1), i64(0)]))
    assert_agrees(verifier, OneNodeModel(
        "Slice", [x, i64(-1, 3), i64(-(2**63), 0), i64(2, 1), i64(-2, -1)]))
    assert_agrees(verifier, OneNodeModel("Slice", [x, i64(-100, 1), i64(100, -1)]))


def test_providerWrong_range_matchesReference(verifier):
    assert_agrees(verifier, OneNodeModel("Range", [np.array(3, np.int64), np.array(-8, np.int64),
                                                   np.array(-3, np.int64)]))
    assert_agrees(verifier, OneNodeModel("Range", [i64(0), i64(5), i64(1)], constants=(0, 1, 2)))


@pytest.mark.parametrize("shapes", [((4, 6), (6, 5)), ((2, 3, 4, 6), (2, 1, 6, 5)),
                                    ((6,), (6, 5)), ((3, 4, 40), (40, 2))])
def test_providerWrong_matmulIntegerBatchBroadcast_matchesReference(verifier, shapes):
    a = RNG.integers(0, 256, size=shapes[0]).astype(np.uint8)
    b = RNG.integers(-64, 64, size=shapes[1]).astype(np.int8)
    assert_agrees(verifier, OneNodeModel("MatMulInteger", [a, b, np.array(128, np.uint8)]))


def test_providerWrong_matmulIntegerConstantWeightsWithoutZeroPoint_matchesReference(verifier):
    a = RNG.integers(0, 256, size=(3, 70)).astype(np.uint8)  # K = 70: two words and a tail
    b = np.where(RNG.random((70, 4)) < 0.5, -64, 63).astype(np.int8)  # the range's ends
    assert_agrees(verifier, OneNodeModel("MatMulInteger", [a, b], constants=(1,)))


def assert_agrees_on(verifier, model: OneNodeModel, indices) -> None:
    for index in indices:
        witness = model.prover.witness(model.k, index)
        assert chain_verdict(verifier, model.prover, witness) is False, index
        provider = model.lying(with_flipped(model.output, index))
        witness = model.prover.witness(model.k, index, provider=provider)
        assert chain_verdict(verifier, model.prover, witness, provider) is True, index


CHAIN_EXAMPLES = settings(max_examples=examples(12), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


@given(data=st.data())
@CHAIN_EXAMPLES
def test_providerWrong_randomSliceParameters_matchReference(verifier, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    axes = data.draw(st.permutations(range(len(shape))))[: data.draw(
        st.integers(1, len(shape)))]
    bound = st.integers(-7, 7) | st.sampled_from([-(2**63), 2**63 - 1])
    starts = [data.draw(bound) for _ in axes]
    steps = [data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    ends = [data.draw(st.integers(-7, 7) | st.sampled_from([-(2**63)])) if step < 0
            else data.draw(bound) for step in steps]
    model = OneNodeModel("Slice", [x, i64(*starts), i64(*ends), i64(*axes), i64(*steps)])
    assume(model.output.size > 0)  # an empty window has no element to check: another draw
    assert_agrees_on(verifier, model, {0, model.output.size - 1})


@given(data=st.data())
@CHAIN_EXAMPLES
def test_providerWrong_randomBroadcastShapes_matchReference(verifier, data):
    out = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    shapes = []
    for _ in range(2):
        rank = data.draw(st.integers(0, len(out)))
        shapes.append(tuple(d if data.draw(st.booleans()) else 1 for d in out[len(out) - rank:]))
    op = data.draw(st.sampled_from(["Add", "Sub", "Mul", "Min", "Max", "Greater"]))
    # The values from a drawn seed, not the module's RNG, whose state depends on which tests
    # ran before: the same example must get the same values in every run.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    a, b = (rng.integers(-1000, 1000, size=shape).astype(np.int32) for shape in shapes)
    model = OneNodeModel(op, [a, b])
    assert_agrees_on(verifier, model, {0, model.output.size - 1})


@pytest.mark.parametrize("k", [1, 31, 32, 33, 95, 1000])
def test_providerWrong_matmulIntegerPackedLanesAndTail_exactAtExtremes(verifier, k):
    """The dot product runs whole 32-byte words as packed lanes and the rest byte by byte:
    every split of K, with A and B at their extremes (0/255, -64/63) and any zero point."""
    a = np.where(RNG.random((2, k)) < 0.5, 0, 255).astype(np.uint8)
    b = np.where(RNG.random((k, 2)) < 0.5, -64, 63).astype(np.int8)
    zero_point = np.array(RNG.integers(0, 256), np.uint8)
    model = OneNodeModel("MatMulInteger", [a, b, zero_point])
    assert_agrees_on(verifier, model, {0, 3})


# ------------------------------------------------------------------------------------------------
# The provider loses: refusals, wrong dtype or shape
# ------------------------------------------------------------------------------------------------


def witness_up_to_refusal(model: OneNodeModel, index: int) -> Witness:
    """The challenger's witness when the op set refuses the agreed inputs part-way through
    the openings (a Gather index outside [-dim, dim)): every opening up to the refusing one,
    which `OneStepProver.witness` returns (it raised the refusal before issue 17 point 4)."""
    witness = model.prover.witness(model.k, index)
    assert witness.k == model.k and witness.out_index == index
    return witness


def assert_provider_loses(verifier, model: OneNodeModel, index: int = 0) -> None:
    witness = witness_up_to_refusal(model, index)
    assert reference_verdict(model.prover, witness) is True
    assert chain_verdict(verifier, model.prover, witness) is True


@pytest.mark.parametrize("case", [
    # op, inputs, attributes, the output shape the node has, the disputed element
    ("Div", [np.array([4, 5], np.int32), np.array([2, 0], np.int32)], {}, (2,), 1),
    ("Div", [i64(-(2**63)), i64(-1)], {}, (1,), 0),
    ("Gather", [ints((4, 2)), i64(1, 4)], {}, (2, 2), 2),  # index 4 outside [-4, 4)
    ("Gather", [ints((4, 2)), i64(-5)], {}, (1, 2), 1),
    ("Gather", [ints((4, 2)), np.array([1, 9], np.int32)], {}, (2, 2), 2),  # int32, outside
    ("Gather", [ints((4, 2)), np.array([1], np.int8)], {}, (1, 2), 0),  # int8 indices
    ("Reshape", [ints((2, 3)), np.array([3, 2], np.int32)], {}, (3, 2), 0),  # int32 shape
    ("Add", [np.array([1, 2], np.int8), np.array([3, 4], np.int8)], {}, (2,), 0),  # int8
    ("ReduceSum", [np.array([[2**31 - 1, 1]], np.int32), i64(1)], {}, (1, 1), 0),  # > int32
    ("ReduceSum", [i64(2**52 + 1, -5), i64(0)], {}, (1,), 0),  # beyond 2**53 / 2
    ("Range", [i64(0), i64(5), i64(0)], {}, (2,), 0),  # delta 0: no output shape at all
    ("ArgMax", [ints((2, 3))], {"select_last_index": 1}, (1, 3), 0),
    ("Transpose", [ints((2, 3))], {"perm": [0, 0]}, (2, 3), 0),
])
def test_providerWrong_opSetRefusal_providerLoses(verifier, case):
    op, inputs, attributes, shape, index = case
    # The op set has no result: whatever the provider committed (zeros here) is wrong.
    with pytest.raises(opset.OpSemanticsError):
        opset.OPS[op].function(*inputs, **attributes)
    model = OneNodeModel(op, inputs, output=np.zeros(shape, inputs[0].dtype), **attributes)
    assert_provider_loses(verifier, model, index)


def test_providerWrong_matmulWeightOutsideSevenBits_providerLoses(verifier):
    a = RNG.integers(0, 256, size=(2, 40)).astype(np.uint8)
    b = RNG.integers(-64, 64, size=(40, 3)).astype(np.int8)
    b[37, 1] = 64  # in the tail word of column 1
    output = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
    model = OneNodeModel("MatMulInteger", [a, b], output=output)
    assert_provider_loses(verifier, model, 1)
    assert_agrees(verifier, OneNodeModel("MatMulInteger", [a, np.delete(b, 1, axis=1)]))


def test_providerWrong_outputOfWrongShapeOrDtype_providerLoses(verifier):
    x, y = ints((3, 4)), ints((3, 1))
    honest = OneNodeModel("Add", [x, y])
    for wrong in (honest.output[:2], honest.output.reshape(4, 3), honest.output.astype(np.int32)):
        model = OneNodeModel("Add", [x, y], output=wrong)
        assert_provider_loses(verifier, model)


# ------------------------------------------------------------------------------------------------
# Malformed witnesses revert with the broken rule
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gather_model() -> OneNodeModel:
    """Gather on a constant table (two openings, a leaf and a constant)."""
    return OneNodeModel("Gather", [ints((300, 8)), i64(5, -3, 290)], constants=(0,), axis=0)


def flip_chunk_byte(proof, offset: int):
    chunks = bytearray(proof.chunks)
    chunks[offset] ^= 1
    return dataclasses.replace(proof, chunks=bytes(chunks))


def assert_malformed(verifier, model: OneNodeModel, witness, error: str, ctx=None) -> None:
    assert reference_verdict(model.prover, witness) == "ProofError"
    assert chain_verdict(verifier, model.prover, witness, ctx=ctx) == error


def test_providerWrong_wrongDescriptionPath_reverts(verifier, gather_model):
    witness = gather_model.prover.witness(gather_model.k, 9)
    path = list(witness.description_path)
    path[3] = b"\x01" * 32
    forged = dataclasses.replace(witness, description_path=tuple(path))
    assert_malformed(verifier, gather_model, forged, "DescriptionNotInModel")
    short = dataclasses.replace(witness, description_path=witness.description_path[:-1])
    assert_malformed(verifier, gather_model, short, "DescriptionPathLengthMismatch")
    zero = context(gather_model.nodes_root, gather_model.constants_root,
                   gather_model.trace.state.root(0), gather_model.trace.roots[1], 0, 9)
    assert chain_verdict(verifier, gather_model.prover, witness, ctx=zero) == "NodeIndexZero"


def test_providerWrong_wrongTensorPath_reverts(verifier, gather_model):
    witness = gather_model.prover.witness(gather_model.k, 9)
    table, indices = witness.tensors  # position 0: the constant, position 1: leaf 1
    path = list(indices.path)
    path[0] = b"\x02" * 32
    forged = (table, dataclasses.replace(indices, path=tuple(path)))
    assert_malformed(verifier, gather_model, dataclasses.replace(witness, tensors=forged),
                     "TensorNotInAgreedState")
    wrong_table = dataclasses.replace(table, data_root=indices.data_root)
    assert_malformed(verifier, gather_model,
                     dataclasses.replace(witness, tensors=(wrong_table, indices)),
                     "TensorNotInConstants")
    renamed = dataclasses.replace(indices, ref=dataclasses.replace(indices.ref, index=0))
    assert_malformed(verifier, gather_model,
                     dataclasses.replace(witness, tensors=(table, renamed)),
                     "OpenedTensorRefMismatch")
    assert_malformed(verifier, gather_model, dataclasses.replace(witness, tensors=(table,)),
                     "OpenedTensorsMismatch")
    assert_malformed(verifier, gather_model,
                     dataclasses.replace(witness, tensors=(table, indices, indices)),
                     "OpenedTensorsMismatch")


def test_providerWrong_openingsOutOfOrderMissingOrExtra_revert(verifier, gather_model):
    witness = gather_model.prover.witness(gather_model.k, 9)
    index, entry = witness.ranges
    assert_malformed(verifier, gather_model, dataclasses.replace(witness, ranges=(entry, index)),
                     "OpeningMismatch")
    assert_malformed(verifier, gather_model, dataclasses.replace(witness, ranges=(index,)),
                     "OpeningMismatch")
    assert_malformed(verifier, gather_model,
                     dataclasses.replace(witness, ranges=(index, entry, entry)), "ExtraOpening")
    moved = dataclasses.replace(entry, opening=dataclasses.replace(
        entry.opening, start_element=entry.opening.start_element + 1))
    assert_malformed(verifier, gather_model, dataclasses.replace(witness, ranges=(index, moved)),
                     "OpeningMismatch")


def test_providerWrong_tamperedChunkByte_reverts(verifier, gather_model):
    witness = gather_model.prover.witness(gather_model.k, 9)
    index, entry = witness.ranges
    byte = entry.opening.start_element * 8 % 1024
    tampered = dataclasses.replace(entry, proof=flip_chunk_byte(entry.proof, byte))
    assert_malformed(verifier, gather_model,
                     dataclasses.replace(witness, ranges=(index, tampered)),
                     "RangeProofRootMismatch")
    output = dataclasses.replace(witness, output_proof=flip_chunk_byte(witness.output_proof, 72))
    assert_malformed(verifier, gather_model, output, "RangeProofRootMismatch")


def test_providerWrong_wrongOutputHeaderOrIndex_reverts(verifier, gather_model):
    witness = gather_model.prover.witness(gather_model.k, 9)
    reshaped = dataclasses.replace(witness, output_shape=(24,))
    assert_malformed(verifier, gather_model, reshaped, "OutputHeaderMismatch")
    past = dataclasses.replace(witness, out_index=24)
    assert_malformed(verifier, gather_model, past, "ElementIndexOutsideTensor")


@pytest.mark.parametrize(("suffix", "error"), [
    (b"\x00", "DescriptionTrailingBytes"),
    (None, "DescriptionTruncated"),
])
def test_providerWrong_malformedDescriptionLength_reverts(verifier, suffix, error):
    good = OneNodeModel("Add", [ints((2,)), ints((2,))]).description
    description = good + suffix if suffix is not None else good[:-1]
    assert_description_reverts(verifier, description, error)


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda d: b"\x00\x63" + d[2:], "UnknownOpCode"),
    (lambda d: d[:3] + b"\x05" + d[4:], "UnknownInputKind"),
    (lambda d: d[:-10] + b"\x06" + d[-9:], "AttributeCodeInvalid"),  # axis -> code 6
])
def test_providerWrong_malformedDescription_reverts(verifier, mutate, error):
    good = OneNodeModel("Gather", [ints((4, 2)), i64(1)], axis=1).description
    assert_description_reverts(verifier, mutate(good), error)


def test_providerWrong_matmulWithoutColumnSource_reverts(verifier):
    a = RNG.integers(0, 256, size=(2, 4)).astype(np.uint8)
    b = RNG.integers(-64, 64, size=(4, 3)).astype(np.int8)
    good = OneNodeModel("MatMulInteger", [a, b]).description
    assert_description_reverts(verifier, good[:-5] + b"\x02\x00\x00\x00\x00",
                               "ColumnSourceMissing", a, b)


def assert_description_reverts(verifier, description: bytes, error: str, *inputs) -> None:
    """A model committing `description` as node k: the witness of an honest model with the
    description swapped in proves it against that model's nodes root, and then fails to parse."""
    honest = OneNodeModel("MatMulInteger", list(inputs)) if inputs else \
        OneNodeModel("Add", [ints((2,)), ints((2,))])
    witness = dataclasses.replace(honest.prover.witness(honest.k, 0), description=description)
    nodes_root = commitments.root_from_path(hashlib.sha256(description).digest(), honest.k,
                                            ZERO_HASHES[:STATE_DEPTH])
    with pytest.raises(ProofError):
        check_witness(witness, nodes_root=nodes_root, constants_root=honest.constants_root,
                      agreed_state=honest.trace.state.root(honest.k - 1),
                      output_root=honest.trace.roots[honest.k])
    ctx = context(nodes_root, honest.constants_root, honest.trace.state.root(honest.k - 1),
                  honest.trace.roots[honest.k], honest.k, 0)
    assert chain_verdict(verifier, honest.prover, witness, ctx=ctx) == error


def test_encodeWitness_isTheAbiTupleOfTheInterface(gather_model):
    witness = gather_model.prover.witness(gather_model.k, 9)
    encoded = encode_witness(witness)
    assert encoded[0] == witness.description and len(encoded[1]) == STATE_DEPTH
    assert [t[:4] for t in encoded[2]] == [(0, False, 1, 0), (1, False, 0, 1)]
    assert [r[:4] for r in encoded[3]] == [(1, False, 1, 1), (0, False, 297 * 8 + 1, 1)]  # index -3
    assert encoded[4:6] == (commitments.dtype_code("int64"), [3, 8])


# ------------------------------------------------------------------------------------------------
# The committed tiny-r1: every op type of the verify graph, and gas
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """tiny-r1's trace of a short generated answer, computed once; the first node of each op."""
    model = IntegerModel(INTEGER_DIR)
    prompt = model.encode(held_out_problems(1, seed=3)[0].prompt)
    output = model.generate(prompt, 6)
    sequence, outputs = model.trace(prompt, output)
    committed = CommittedModel(model)
    prover = OneStepProver(committed, TraceCommitment(sequence, outputs))
    graph = model.verify_graph().graph
    by_op: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node, 1):
        by_op.setdefault(node.op_type, []).append(k)
    return prover, outputs, by_op


def test_providerWrong_everyOpTypeOfTinyR1_honestFalseLyingTrue(verifier, tiny):
    prover, outputs, by_op = tiny
    rng = random.Random(7)
    assert set(by_op) == set(opset.OP_ORDER)
    for op, nodes in sorted(by_op.items()):
        k = rng.choice(nodes)
        index = rng.randrange(outputs[k - 1].size)
        witness = prover.witness(k, index)
        assert chain_verdict(verifier, prover, witness) is False, (op, k, index)
        provider = prover.trace.with_output(k, with_flipped(outputs[k - 1], index))
        lying = prover.witness(k, index, provider=provider)
        assert reference_verdict(prover, lying, provider) is True
        assert chain_verdict(verifier, prover, lying, provider) is True, (op, k, index)
        # Another element of the lying tensor is still right: the challenger must pick.
        other = (index + 1) % outputs[k - 1].size
        if other != index:
            assert chain_verdict(verifier, prover, prover.witness(k, other, provider=provider),
                                 provider) is False


def test_oneStepGas_worstOpOfTinyR1_underTarget(verifier, tiny, w3):
    prover, outputs, by_op = tiny
    trace = ModelTrace(prover.committed, prover.trace)
    gas = {op: max(one_step_gas(w3, verifier, prover.committed, trace, k) for k in nodes[:3])
           for op, nodes in by_op.items()}
    worst = max(gas, key=gas.get)
    print(f"one-step gas per op type on tiny-r1: {dict(sorted(gas.items()))}; worst {worst}")
    # At tiny-r1's width every one-step is a few 1 KiB chunks of calldata: the op with the
    # most openings (Slice: four parameters and the element) costs most, far below the target.
    assert gas[worst] < GAS_TARGET
    assert set(gas) == set(by_op)


def test_oneStepGas_matmulIntegerAtR1ShapeK8960_underTarget(verifier, w3):
    """The worst one-step of R1-Distill-1.5B: an element of mlp.down (K = 8960), weights as a
    constant committed transposed. Gas includes base cost and calldata (two 8960-byte rows in
    1 KiB chunks) and the range proofs."""
    k = 8960
    a = RNG.integers(0, 256, size=(2, k)).astype(np.uint8)
    b = RNG.integers(-64, 64, size=(k, 3)).astype(np.int8)
    model = OneNodeModel("MatMulInteger", [a, b, np.array(128, np.uint8)], constants=(1, 2))
    witness = model.prover.witness(model.k, 5)
    ctx = prover_context(model.prover, witness)
    assert verifier.provider_wrong(ctx, witness) is False
    gas = verifier.estimate_gas(ctx, witness)
    print(f"one-step gas, MatMulInteger K=8960: {gas}")
    assert gas < GAS_TARGET


# ------------------------------------------------------------------------------------------------
# 16-bit linear inputs (two uint8 planes): the nodes the option adds, on chain
# ------------------------------------------------------------------------------------------------


def test_providerWrong_sixteenBitPlanesNodes_honestFalseLyingTrue(verifier, random_checkpoint,
                                                                  tmp_path):
    """A random checkpoint converted with 16-bit linear inputs: one node of each kind the
    option adds (the planes' Div and Casts, their Concat, the MatMulInteger over both planes,
    the Slices with a dynamic end and start, the recombination's Adds and Div, the lm_head's
    row count; the 28-bit residual's norm; the key and probability planes, the keys' on a
    batch axis the queries broadcast over) decides on chain as the reference does, honest and
    lying, at its first, last and a random element."""
    from optinfer.models.converter import convert

    convert(random_checkpoint, tmp_path / "int16", max_context=32, linear_input_bits=16)
    assert_nodes_decide_on_chain_as_the_reference(verifier, IntegerModel(tmp_path / "int16"), (
                 "L0.attn_norm.hi.value", "L0.attn_norm.hi", "L0.attn_norm.lo", "L0.attn_norm",
                 "L0.attn.out.planes", "L0.mlp.act.planes.lo", "L0.attn.q.acc.planes",
                 "L0.mlp.down.acc.hi", "L0.mlp.down.acc.lo", "L0.mlp.down.acc.lo.biased",
                 "L0.mlp.down.acc.lo.shift", "L0.mlp.down.acc.sum", "L0.attn.k.acc",
                 "final.length.1d", "lm_head.acc",
                 # the fine residual's norm: each row's top bits
                 "L1.attn_norm.r2max", "L1.attn_norm.r2max.bitlen", "L1.attn_norm.excess.pos",
                 "L1.attn_norm.k", "L1.attn_norm.unit", "L1.attn_norm.top",
                 "L1.attn_norm.rms.scaled",
                 # 13-bit keys and 14-bit probabilities as planes
                 "L0.attn.k.cache.u.hi", "L0.attn.k.cache.hi", "L0.attn.k.cache.lo.value",
                 "L0.attn.k.cache", "L1.attn.scores.planes", "L1.attn.scores.hi",
                 "L1.attn.scores.sum", "L1.attn.scores", "L0.attn.prob", "L0.attn.pv.planes",
                 "L0.attn.pv.lo", "L0.attn.pv",
                 # masked scores floored below every visible one
                 "mask.penalty", "L0.attn.masked.floor"), 16)


def assert_nodes_decide_on_chain_as_the_reference(verifier, model: IntegerModel, names,
                                                  seed: int) -> None:
    """For each named node of a short trace of `model`: at its first, last and a random
    element, the honest witness and a witness of the changed element decide on chain as the
    reference does (False, then True)."""
    output = model.generate([5, 9, 40], 3, stop_at_eos=False)
    sequence, outputs = model.trace([5, 9, 40], output)
    prover = OneStepProver(CommittedModel(model), TraceCommitment(sequence, outputs))
    nodes = [node.name for node in model.verify_graph().graph.node]
    rng = random.Random(seed)
    for name in names:
        k = nodes.index(name) + 1
        for index in sample_elements(outputs[k - 1].size, rng, most=3):
            witness = prover.witness(k, index)
            assert reference_verdict(prover, witness) is False, (name, index)
            assert chain_verdict(verifier, prover, witness) is False, (name, index)
            provider = prover.trace.with_output(k, with_flipped(outputs[k - 1], index))
            lying = prover.witness(k, index, provider=provider)
            assert reference_verdict(prover, lying, provider) is True, (name, index)
            assert chain_verdict(verifier, prover, lying, provider) is True, (name, index)


# ------------------------------------------------------------------------------------------------
# The fine graph (13-bit weights as two planes, 13-bit values, 12-bit queries, 24-bit input)
# ------------------------------------------------------------------------------------------------


def test_providerWrong_fineGraphNodes_honestFalseLyingTrue(verifier, random_checkpoint,
                                                           tmp_path):
    """A random checkpoint converted as the fine graph: one node of each kind it adds (the
    weight planes' product and its int64 recombination, the value and query planes, the masked
    scores' floor, the 24-bit input's three planes, the logits' rounding and their blocks'
    Concat) decides on chain as the reference does, honest and lying, at its first, last and a
    random element."""
    from tests.test_fine_graph import FINE_NODES, convert_fine

    assert_nodes_decide_on_chain_as_the_reference(
        verifier, convert_fine(random_checkpoint, tmp_path / "fine", max_context=32),
        (*FINE_NODES, "L0.attn.masked.floor", "mask.penalty"), 13)
