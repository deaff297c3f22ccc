"""The one-step: recompute ONE output element of node k from openings, as the contract does.

This module, with `optinfer.prover.one_step_element`, is the executable spec the Solidity
OneStepVerifier mirrors (docs/protocol.md, "One step"). At the end of a dispute the challenger
opens, for element `out_index` of node k:

* node k's description (op, attributes, which tensors it reads), against the model's
  `nodes_root`;
* the header and root of every tensor the node reads: an earlier state leaf `j < k` against the
  agreed state `S_{k-1}`, or a constant `c` against the model's `constants_root` (a
  MatMulInteger B constant in its committed, transposed form);
* the element ranges of those tensors that the element depends on (`element_dependencies`),
  each with a range proof against the tensor's root;
* the provider's claimed value, as an element opening of node k's own tensor `T_k`.

The verifier recomputes the element from the opened values alone (`recompute_element`, with
the exact integer semantics of `optinfer.models.opset`), and also recomputes node k's output
dtype and shape from the opened headers and parameters: a provider whose `T_k` has the wrong
shape loses just as one with a wrong value.

Three modules, from pure to stateful:

1. `optinfer.prover.one_step_element`: `parse_node_description`, `element_dependencies`,
   `recompute_element`, `expected_output` (dtype and shape): functions of a node and opened
   values, no I/O.
2. This module: `Witness` / `check_witness`: a complete one-step submission and the
   contract's checks (`WrongClaim` when the provider loses).
3. `optinfer.prover.one_step_prover`: `CommittedModel`, `TraceCommitment`, `OneStepProver` /
   `one_step_witness`: building the witness from a converted model and a trace (the
   challenger's side), each commitment computed once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from optinfer.models import opset
from optinfer.models.manifest import INPUT_LEAF
from optinfer.prover import commitments
from optinfer.prover.commitments import ProofError, RangeProof
from optinfer.prover.one_step_element import (
    COLUMNS,
    NATURAL,
    Opening,
    StepNode,
    TensorRef,
    element_dependencies,
    expected_output,
    first_values,
    parameter_openings,
    parameter_values,
    parse_node_description,
    recompute_element,
)


class WrongClaim(ProofError):
    """Every proof verifies, and the provider's claimed element (or its tensor's dtype or
    shape) is not what the node computes: the provider loses the one-step."""

    def __init__(self, message: str, recomputed: int | None = None, claimed: int | None = None):
        super().__init__(message)
        self.recomputed = recomputed
        self.claimed = claimed


@dataclass(frozen=True)
class OpenedTensor:
    """The header and root of one tensor node k reads, and the path that proves the root: in
    the state tree at `S_{k-1}` (a leaf, `len(path) == STATE_DEPTH`) or in the constants tree.
    `data_root` binds the header to the root even when no element of the tensor is opened
    (Shape reads only the header). For MatMulInteger's B, position 1 with layout COLUMNS: the
    column source."""

    position: int
    layout: str
    ref: TensorRef
    dtype: int
    shape: tuple[int, ...]
    data_root: bytes
    root: bytes
    path: tuple[bytes, ...]

    @property
    def header(self) -> bytes:
        return commitments.tensor_header(self.dtype, self.shape)


@dataclass(frozen=True)
class OpenedRange:
    """One Opening with its range proof against its tensor's root."""

    opening: Opening
    proof: RangeProof


@dataclass(frozen=True)
class Witness:
    """Everything a challenger submits for element `out_index` of node `k`.

    `description_path` proves `sha256(description)` at index k of `nodes_root`. `tensors`:
    one OpenedTensor per input the node reads (MatMulInteger's B replaced by its column
    source). `ranges`: the openings of `element_dependencies`, in its order, with proofs.
    `output_*`: the header and data root of the provider's `T_k`, and its element
    `out_index` (`output_proof` opens its bytes); `claimed` is that element's value.
    """

    k: int
    out_index: int
    description: bytes
    description_path: tuple[bytes, ...]
    tensors: tuple[OpenedTensor, ...]
    ranges: tuple[OpenedRange, ...]
    output_dtype: int
    output_shape: tuple[int, ...]
    output_data_root: bytes
    output_proof: RangeProof
    claimed: int

    @property
    def node(self) -> StepNode:
        return parse_node_description(self.description)

    def byte_size(self) -> int:
        """Bytes of calldata the witness amounts to: the description and every hash, header,
        chunk and index it carries (32 bytes per hash, 8 per integer field)."""
        size = len(self.description) + 32 * len(self.description_path) + 8 * 2
        for tensor in self.tensors:
            size += len(tensor.header) + 32 * (2 + len(tensor.path)) + 8
        for opened in self.ranges:
            size += len(opened.proof.chunks) + 32 * len(opened.proof.siblings) + 8 * 3
        size += len(commitments.tensor_header(self.output_dtype, self.output_shape)) + 32
        size += len(self.output_proof.chunks) + 32 * len(self.output_proof.siblings) + 8
        return size


def check_witness(
    witness: Witness,
    *,
    nodes_root: bytes,
    constants_root: bytes,
    agreed_state: bytes,
    output_root: bytes,
) -> int:
    """The contract's one-step check. Returns the recomputed element when it equals the claim.

    `agreed_state` is `S_{k-1}`, `output_root` the provider's `T_k` (revealed at the leaf
    update). In order:

    1. the description against `nodes_root` at index k;
    2. every opened tensor: header and data root give its root, the root is leaf j < k of
       `S_{k-1}` or constant c of `constants_root`;
    3. the parameter openings, with their range proofs;
    4. `T_k`'s header and data root against `output_root`; the dtype and shape the node must
       output (`expected_output`) against that header;
    5. the claimed element's range proof against `output_root`;
    6. the data openings, exactly `element_dependencies`' in its order, with range proofs;
    7. the element recomputed (`recompute_element`) against the claim.

    A failure in 1-3, 5 or 6 raises ProofError: the submission is malformed (the contract
    reverts). A difference in 4 or 7 raises WrongClaim: the provider loses. So does an input
    on which the op set refuses to compute (OpSemanticsError): the inputs are the agreed,
    honest state, so no claimed value for node k can be right there.
    """
    k = witness.k
    if k < 1:
        raise ProofError("node indices start at 1")
    _check_path(witness.description_path, commitments.STATE_DEPTH, "description")
    description_leaf = hashlib.sha256(witness.description).digest()
    if commitments.root_from_path(description_leaf, k, witness.description_path) != nodes_root:
        raise ProofError(f"the description is not node {k}'s")
    node = parse_node_description(witness.description)

    tensors = {(t.position, t.layout): t for t in witness.tensors}
    if sorted(tensors) != sorted(expected_tensor_slots(node)) or len(tensors) != len(
            witness.tensors):
        raise ProofError("the opened tensors are not the ones the node reads")
    for (position, layout), tensor in tensors.items():
        expected_ref = node.column_source if layout == COLUMNS else node.inputs[position]
        if tensor.ref != expected_ref:
            raise ProofError(f"input {position} is {expected_ref}, not {tensor.ref}")
        _check_tensor(tensor, k, agreed_state, constants_root)
    in_shapes, in_dtypes = input_signature(node, tensors)

    ranges = iter(witness.ranges)
    opened: dict[Opening, np.ndarray] = {}
    _open_verified(parameter_openings(node, in_shapes), ranges, tensors, opened)

    out_shape = tuple(witness.output_shape)
    if commitments.tensor_root_from_data_root(witness.output_dtype, out_shape,
                                              witness.output_data_root) != output_root:
        raise ProofError("the output header and data root do not give T_k")
    parameters = parameter_values(node, in_shapes, first_values(opened))
    expected = _refusal_loses(k, lambda: expected_output(node, in_shapes, in_dtypes, parameters))
    if expected != (witness.output_dtype, out_shape):
        raise WrongClaim(f"node {k} outputs dtype {expected[0]} shape {expected[1]}, the "
                         f"provider committed dtype {witness.output_dtype} shape {out_shape}")

    if not 0 <= witness.out_index < math.prod(out_shape):
        raise ProofError(f"element {witness.out_index} is outside T_k")
    out_start, out_end = commitments.element_byte_range(witness.output_dtype, out_shape,
                                                        witness.out_index)
    claimed_bytes = commitments.verify_tensor_range(
        output_root, witness.output_dtype, out_shape, out_start, out_end, witness.output_proof)
    claimed = commitments.claimed_element(witness.output_dtype, claimed_bytes)
    if claimed != witness.claimed:
        raise ProofError(f"the claimed value {witness.claimed} is not T_k's element {claimed}")

    def open_data() -> None:
        while expected := [o for o in element_dependencies(
                node, witness.out_index, in_shapes, out_shape, first_values(opened))
                if o not in opened]:
            _open_verified(expected, ranges, tensors, opened)

    _refusal_loses(k, open_data)
    if next(ranges, None) is not None:
        raise ProofError("the witness opens more than the element needs")
    value = _refusal_loses(k, lambda: recompute_element(node, opened, witness.out_index,
                                                        in_shapes, out_shape))
    if value != claimed:
        raise WrongClaim(f"element {witness.out_index} of node {k} is {value}, the provider "
                         f"claims {claimed}", recomputed=value, claimed=claimed)
    return value


def _open_verified(expected: Sequence[Opening], ranges, tensors, opened: dict) -> None:
    """Take the next witness ranges, which must be `expected` in order, verify their range
    proofs against their tensors' roots and record the decoded values in `opened`."""
    for opening in expected:
        given = next(ranges, None)
        if given is None or given.opening != opening:
            raise ProofError(f"expected the opening {opening}")
        tensor = tensors[(opening.input_position, opening.layout)]
        itemsize = commitments.numpy_dtype(tensor.dtype).itemsize
        start = opening.start_element * itemsize
        data = commitments.verify_tensor_range(
            tensor.root, tensor.dtype, tensor.shape, start, start + opening.count * itemsize,
            given.proof)
        opened[opening] = commitments.decode_elements(tensor.dtype, data)


def _refusal_loses(k: int, compute):
    """Run `compute`; an op-set refusal on the agreed inputs means node k has no right value."""
    try:
        return compute()
    except opset.OpSemanticsError as error:
        raise WrongClaim(f"node {k} has no defined result on the agreed inputs: {error}") \
            from None


def expected_tensor_slots(node: StepNode) -> list[tuple[int, str]]:
    """(input position, layout) of each tensor the witness must open for the node."""
    slots = []
    for position, ref in enumerate(node.inputs):
        if ref is None:
            continue
        layout = COLUMNS if node.op_type == "MatMulInteger" and position == 1 else NATURAL
        slots.append((position, layout))
    return slots


def input_signature(node: StepNode, tensors: Mapping[tuple[int, str], OpenedTensor]):
    """Per input position: its shape in ONNX layout (B un-swapped from its column source) and
    dtype code; None for absent inputs."""
    shapes: list[tuple[int, ...] | None] = [None] * len(node.inputs)
    dtypes: list[int | None] = [None] * len(node.inputs)
    for (position, layout), tensor in tensors.items():
        shape = tuple(tensor.shape)
        if layout == COLUMNS:
            if len(shape) < 2:
                raise ProofError("a column source has rank >= 2")
            shape = (*shape[:-2], shape[-1], shape[-2])
        shapes[position], dtypes[position] = shape, tensor.dtype
    return shapes, dtypes


def _check_tensor(tensor: OpenedTensor, k: int, agreed_state: bytes,
                  constants_root: bytes) -> None:
    if commitments.tensor_root_from_data_root(tensor.dtype, tensor.shape,
                                              tensor.data_root) != tensor.root:
        raise ProofError(f"{tensor.ref}: header and data root do not give its root")
    if tensor.ref.kind == INPUT_LEAF:
        if not tensor.ref.index < k:
            raise ProofError(f"node {k} cannot read leaf {tensor.ref.index}")
        _check_path(tensor.path, commitments.STATE_DEPTH, "state leaf")
        if tensor.root == commitments.ZERO or commitments.root_from_path(
                tensor.root, tensor.ref.index, tensor.path) != agreed_state:
            raise ProofError(f"{tensor.ref} is not in the agreed state S_{k - 1}")
    else:
        # The constants tree's depth is not fixed by the protocol, but a root proven at the
        # wrong height would have to be a 64-byte preimage (an internal node) or sit below a
        # tensor root, whose preimage is a 34 + 8n byte header and data root: never 64 bytes.
        if commitments.root_from_path(tensor.root, tensor.ref.index, tensor.path) \
                != constants_root:
            raise ProofError(f"{tensor.ref} is not in the model's constants")


def _check_path(path: Sequence[bytes], depth: int, what: str) -> None:
    if len(path) != depth:
        raise ProofError(f"{what} path has {len(path)} siblings, expected {depth}")

