"""Building one-step witnesses: the challenger's side of the one-step.

`CommittedModel` (a converted model's node descriptions, committed constants and their trees)
and `TraceCommitment` (a trace's tensor roots and state tree), each computed once;
`OneStepProver` and `one_step_witness` open what `optinfer.prover.one_step_element` says an
element needs and assemble the `optinfer.prover.one_step.Witness` that `check_witness` there
accepts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from optinfer.models import opset
from optinfer.models.manifest import (
    INPUT_LEAF,
    column_sources,
    committed_constant,
    node_description,
)
from optinfer.prover import commitments
from optinfer.prover.one_step import (
    OpenedRange,
    OpenedTensor,
    Witness,
    check_witness,
    expected_tensor_slots,
    input_signature,
)
from optinfer.prover.one_step_element import (
    COLUMNS,
    Opening,
    StepNode,
    TensorRef,
    element_dependencies,
    first_values,
    parameter_openings,
    parse_node_description,
)


class CommittedModel:
    """A converted model's commitments, built once: node descriptions and the nodes tree,
    committed constants (MatMulInteger B transposed) and the constants tree. Checked against
    the manifest's roots."""

    def __init__(self, model) -> None:
        from optinfer.models.reference import load_initializer

        proto = model.verify_graph()
        graph = proto.graph
        leaf_of = {graph.input[0].name: 0}
        leaf_of.update({node.output[0]: k for k, node in enumerate(graph.node, 1)})
        self.constant_names = [t.name for t in graph.initializer]
        constant_of = {name: i for i, name in enumerate(self.constant_names)}
        sources = column_sources(proto)
        self.descriptions = [node_description(node, leaf_of, constant_of,
                                              sources.get(node.output[0]))
                             for node in graph.node]
        self.node_count = len(self.descriptions)
        self._node_levels = commitments.tree_levels(
            [commitments.ZERO] + [hashlib.sha256(d).digest() for d in self.descriptions],
            commitments.STATE_DEPTH)
        transposed = {n.input[1] for n in graph.node if n.op_type == "MatMulInteger"}
        self.constants = [committed_constant(load_initializer(t, model.dir), t.name in transposed)
                          for t in graph.initializer]
        self._constant_trees: dict[int, commitments.TensorTree] = {}
        self._constant_levels = commitments.tree_levels(
            [self.constant_tree(c).root for c in range(len(self.constants))])
        for name, root in (("nodes_root", self.nodes_root),
                           ("constants_root", self.constants_root)):
            if "0x" + root.hex() != model.manifest[name]:
                raise ValueError(f"the model's {name} does not match its manifest")

    @property
    def nodes_root(self) -> bytes:
        return self._node_levels[-1][0]

    @property
    def constants_root(self) -> bytes:
        return self._constant_levels[-1][0]

    def description_path(self, k: int) -> tuple[bytes, ...]:
        return tuple(level[(k >> h) ^ 1] for h, level in enumerate(self._node_levels[:-1]))

    def constant_path(self, c: int) -> tuple[bytes, ...]:
        return tuple(level[(c >> h) ^ 1] for h, level in enumerate(self._constant_levels[:-1]))

    def constant_tree(self, c: int) -> commitments.TensorTree:
        if c not in self._constant_trees:
            self._constant_trees[c] = commitments.TensorTree(self.constants[c])
        return self._constant_trees[c]


class TraceCommitment:
    """A trace's tensor roots `T_0 .. T_N` and its StateTree, computed once; data trees of the
    tensors are built on first use (a witness opens a few of them)."""

    def __init__(self, sequence: np.ndarray, outputs: Sequence[np.ndarray]) -> None:
        self.tensors = [np.asarray(sequence), *(np.asarray(x) for x in outputs)]
        self._trees: dict[int, commitments.TensorTree] = {}
        self.roots = [commitments.tensor_root(x) for x in self.tensors]
        self.state = commitments.StateTree()
        self.state.extend(self.roots)

    def tree(self, leaf: int) -> commitments.TensorTree:
        if leaf not in self._trees:
            self._trees[leaf] = commitments.TensorTree(self.tensors[leaf])
        return self._trees[leaf]

    def with_output(self, k: int, tensor: np.ndarray) -> TraceCommitment:
        """A copy whose node k output is `tensor` (a provider lying at node k)."""
        outputs = list(self.tensors[1:])
        outputs[k - 1] = tensor
        return TraceCommitment(self.tensors[0], outputs)


class OneStepProver:
    """Builds one-step witnesses for any element of any node of one verification trace."""

    def __init__(self, committed: CommittedModel, trace: TraceCommitment) -> None:
        self.committed, self.trace = committed, trace

    def witness(self, k: int, out_index: int, provider: TraceCommitment | None = None) -> Witness:
        """The witness for element `out_index` of node k; the claimed element is opened from
        `provider`'s trace (default: the honest one) while inputs come from the honest
        `S_{k-1}` (the agreed state at the one-step). For an element the op set refuses on
        those inputs (a Gather index outside the table), the openings up to the one the
        refusal shows on: the provider loses that one-step whatever it claims."""
        description, node, tensors, in_shapes = self._node_inputs(k)
        output = (provider or self.trace).tree(k)
        out_shape = tuple(output.array.shape)
        ranges: list[OpenedRange] = []
        opened: dict[Opening, np.ndarray] = {}
        while new := _openings_still_needed(node, out_index, in_shapes, out_shape, opened):
            for opening in new:
                ranges.append(self._open(tensors, opening, opened))
        out_start, out_end = commitments.element_byte_range(output.array.dtype, out_shape,
                                                            out_index)
        return Witness(
            k=k, out_index=out_index, description=description,
            description_path=self.committed.description_path(k),
            tensors=tuple(tensors.values()), ranges=tuple(ranges),
            output_dtype=commitments.dtype_code(output.array.dtype), output_shape=out_shape,
            output_data_root=output.data_root,
            output_proof=output.range_proof(out_start, out_end),
            claimed=int(output.array.ravel()[out_index]))

    def header_witness(self, k: int, output_dtype: int, output_shape: Sequence[int],
                       output_data_root: bytes, output_proof: commitments.RangeProof,
                       out_index: int = 0) -> Witness:
        """A witness that convicts a `T_k` whose header (``output_dtype``, ``output_shape``)
        is not the one node k computes: checks 1-3 (description, input headers, parameters)
        and the header, with no data opening, since the one-step decides at check 4 before it
        reads any element. It works whatever the claimed tensor's size, empty included, where
        an element witness would need an element that the honest output may not have."""
        description, node, tensors, in_shapes = self._node_inputs(k)
        opened: dict[Opening, np.ndarray] = {}
        ranges = [self._open(tensors, opening, opened)
                  for opening in parameter_openings(node, in_shapes)]
        return Witness(
            k=k, out_index=out_index, description=description,
            description_path=self.committed.description_path(k),
            tensors=tuple(tensors.values()), ranges=tuple(ranges),
            output_dtype=output_dtype, output_shape=tuple(output_shape),
            output_data_root=output_data_root, output_proof=output_proof, claimed=0)

    def _node_inputs(self, k: int):
        """Node k's description, parsed node, opened input tensors and input shapes."""
        if not 1 <= k <= self.committed.node_count:
            raise ValueError(f"node {k} outside 1..{self.committed.node_count}")
        description = self.committed.descriptions[k - 1]
        node = parse_node_description(description)
        tensors = {}
        for position, layout in expected_tensor_slots(node):
            ref = node.column_source if layout == COLUMNS else node.inputs[position]
            tensors[(position, layout)] = self._opened_tensor(position, layout, ref, k)
        in_shapes, _ = input_signature(node, tensors)
        return description, node, tensors, in_shapes

    def _open(self, tensors, opening: Opening, opened: dict[Opening, np.ndarray]) -> OpenedRange:
        """Prove `opening` from the input tensor it names and record its values in `opened`."""
        tree = self._tree(tensors[(opening.input_position, opening.layout)].ref)
        itemsize = tree.array.dtype.itemsize
        start = opening.start_element * itemsize
        opened[opening] = tree.array.ravel()[
            opening.start_element : opening.start_element + opening.count]
        return OpenedRange(opening, tree.range_proof(start, start + opening.count * itemsize))

    def check(self, witness: Witness, provider: TraceCommitment | None = None) -> int:
        """check_witness against this model's roots and the trace's `S_{k-1}` and `T_k`."""
        provider = provider or self.trace
        return check_witness(
            witness, nodes_root=self.committed.nodes_root,
            constants_root=self.committed.constants_root,
            agreed_state=self.trace.state.root(witness.k - 1),
            output_root=provider.roots[witness.k])

    def _tree(self, ref: TensorRef) -> commitments.TensorTree:
        if ref.kind == INPUT_LEAF:
            return self.trace.tree(ref.index)
        return self.committed.constant_tree(ref.index)

    def _opened_tensor(self, position: int, layout: str, ref: TensorRef, k: int) -> OpenedTensor:
        tree = self._tree(ref)
        if ref.kind == INPUT_LEAF:
            path = tuple(self.trace.state.path(ref.index, k - 1))
        else:
            path = self.committed.constant_path(ref.index)
        return OpenedTensor(position, layout, ref, commitments.dtype_code(tree.array.dtype),
                            tuple(tree.array.shape), tree.data_root, tree.root, path)


def one_step_witness(model, prompt: Sequence[int], output: Sequence[int], k: int,
                     out_index: int) -> Witness:
    """The witness for element `out_index` of node k of the verification trace of
    (`prompt`, `output`) on `model` (an IntegerModel). Builds every commitment; to build many
    witnesses use `OneStepProver(CommittedModel(model), TraceCommitment(*model.trace(...)))`."""
    sequence, outputs = model.trace(list(prompt), list(output))
    return OneStepProver(CommittedModel(model), TraceCommitment(sequence, outputs)).witness(
        k, out_index)


def _openings_still_needed(node: StepNode, out_index: int, in_shapes, out_shape,
                           opened: Mapping[Opening, np.ndarray]) -> list[Opening]:
    """The openings of `element_dependencies` not yet in `opened`; none once the op set
    refuses the values opened so far (a Gather index outside [-dim, dim)): a witness then
    ends with the opening on which the one-step finds the refusal, and the provider loses."""
    try:
        needed = element_dependencies(node, out_index, in_shapes, out_shape,
                                      first_values(opened))
    except opset.OpSemanticsError:
        return []
    return [o for o in needed if o not in opened]
