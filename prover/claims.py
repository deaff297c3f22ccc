"""The honest trace of any claim, including one the model has no answer for (docs/protocol.md,
"The verified computation"; issue 17 point 4).

A claim (P, O) is verified on ``sequence = [len(P)] ++ P ++ O[:-1]``, whatever its token ids:
the contract computes ``S_0`` from the on-chain prompt and output, and the coordinator takes
any uint32 id. When every id of the sequence is in the vocabulary and it fits the context,
ONNX Runtime computes the trace (an id outside the vocabulary at O's last position is not in
the sequence: the trace exists and ends in in-vocabulary predictions, so it never ends in O).

Otherwise the verify graph reaches a node the op set refuses on the honest inputs: the
embedding's Gather with an index outside the table (ONNX Runtime fails the run there). That
node ``k`` has no right value, so whatever ``T_k`` a provider commits, the one-step of a
refused element convicts it (an ``OpSemanticsError`` on the agreed ``S_{k-1}`` is a
``WrongClaim``). The honest trace is then ``T_0 .. T_{k-1}`` and a `Refusal` naming ``k`` and
one refused element; the challenger disputes every ``S_mid`` with ``mid >= k`` (each holds some
``T_k``) and steers the descent to that element (``prover.game.decide``), so the bisection ends
at ``k`` or at an earlier node where the provider's tensor differs from the honest one.
Nothing past ``k`` is needed, so nothing past it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from optinfer.models import opset
from optinfer.models.manifest import INPUT_LEAF
from optinfer.models.sampling import Sampling, verify_sequence
from optinfer.prover import commitments
from optinfer.prover.one_step_element import (
    StepNode,
    element_from_inputs,
    output_signature,
    parse_node_description,
)
from optinfer.prover.one_step_prover import CommittedModel


@dataclass(frozen=True)
class Refusal:
    """Node `k` is the first node of a claim's verification that the op set refuses on the
    honest inputs; `element` (flat, C order, in the header node `k` must output) is one whose
    one-step is refused, so the provider loses it whatever it committed; 0 when the header
    itself is refused (the one-step convicts any element then)."""

    k: int
    element: int
    reason: str


def claim_sequence(prompt: Sequence[int], output: Sequence[int],
                   draw: Sampling | None = None) -> np.ndarray:
    """The verify graph's input for the claim, as the contract computes leaf 0 (int64):
    ``sampling.verify_sequence``, `draw` None for a greedy-only model."""
    if not prompt or not output:
        raise ValueError("a claim has at least one prompt token and one output token")
    return verify_sequence(prompt, output, draw)


def outside_domain(prompt: Sequence[int], output: Sequence[int], vocab_size: int,
                   max_context: int) -> str | None:
    """Why the model cannot run the claim's sequence (its first id outside the vocabulary, or
    a sequence beyond the context), or None when it can."""
    for where, tokens in (("prompt", prompt), ("output", output[:-1])):
        for i, token in enumerate(tokens):
            if not 0 <= token < vocab_size:
                return (f"{where} token {i} is {token}, outside the vocabulary "
                        f"(0..{vocab_size - 1})")
    length = len(prompt) + len(output) - 1
    if length > max_context:
        return f"the verified sequence of {length} tokens exceeds the context of {max_context}"
    return None


def claim_tensors(model, committed: CommittedModel, prompt: Sequence[int],
                  output: Sequence[int], draw: Sampling | None = None
                  ) -> tuple[np.ndarray, list[np.ndarray], Refusal | None]:
    """The claim's honest trace on `model` (an IntegerModel), decoded by `draw` (greedy when
    None): leaf 0 and the node outputs, with the refusal that ends it early. Refused:
    ``T_1 .. T_{k-1}`` from the numpy reference, then a stand-in for ``T_k`` (zeros with the
    header node k must output: what the challenger compares a provider's header with; its
    values are never claimed), and the `Refusal`."""
    sequence = claim_sequence(prompt, output, model.leaf_draw(draw))
    if outside_domain(prompt, output, model.vocab_size, model.max_context) is None:
        return sequence, list(model.trace_sequence(sequence)), None
    return reference_until_refusal(model, committed, sequence)


def reference_until_refusal(model, committed: CommittedModel, sequence: np.ndarray
                            ) -> tuple[np.ndarray, list[np.ndarray], Refusal | None]:
    """Run the numpy reference (the op set's spec) node by node on `sequence` up to the first
    node it refuses; the whole trace and None when it refuses none."""
    from optinfer.models.reference import iter_node_outputs

    graph = model.verify_graph()
    outputs: list[np.ndarray] = []
    try:
        for result in iter_node_outputs(graph, {"sequence": sequence}, base_dir=model.dir,
                                        keep_all=True):
            outputs.append(result.outputs[0])
    except opset.OpSemanticsError as error:
        k = len(outputs) + 1
        node, inputs = node_input_arrays(committed, [sequence, *outputs], k)
        element = first_refused_element(node, inputs)
        if element is None:
            raise ValueError(f"node {k} refuses the claim's inputs ({error}) but no element's "
                             "one-step does: this trace builder has no value for it") from None
        try:
            dtype, shape = output_signature(node, inputs)
            stand_in = np.zeros(shape, commitments.numpy_dtype(dtype))
        except opset.OpSemanticsError:
            stand_in = np.zeros(0, np.int64)  # no header is right: any element convicts
        name = graph.graph.node[k - 1].name
        reason = (f"node {k} ({name}, {node.op_type}) has no value on the claim's inputs "
                  f"({error}): the one-step of its element {element} convicts any claim")
        return sequence, [*outputs, stand_in], Refusal(k, element, reason)
    return sequence, outputs, None


def node_input_arrays(committed: CommittedModel, tensors: Sequence[np.ndarray], k: int
                      ) -> tuple[StepNode, list[np.ndarray | None]]:
    """Node k's parsed description and its input arrays in ONNX layout: state leaves from
    `tensors` (``T_0 .. T_{k-1}``), constants from the committed model (a MatMulInteger B
    swapped back from its committed, transposed form)."""
    node = parse_node_description(committed.descriptions[k - 1])
    arrays: list[np.ndarray | None] = []
    for position, ref in enumerate(node.inputs):
        if ref is None:
            arrays.append(None)
        elif ref.kind == INPUT_LEAF:
            arrays.append(np.asarray(tensors[ref.index]))
        else:
            array = committed.constants[ref.index]
            if node.op_type == "MatMulInteger" and position == 1:
                array = np.swapaxes(array, -1, -2)
            arrays.append(array)
    return node, arrays


def first_refused_element(node: StepNode, inputs: Sequence[np.ndarray | None]) -> int | None:
    """An element of the node's output whose one-step the op set refuses on `inputs` (the
    first in C order), or None when every element's is defined. 0 when the output's header is
    refused. Gather and GatherElements, what a claim's ids reach, are found from the indices;
    any other op by trying its elements in order."""
    try:
        _, shape = output_signature(node, inputs)
    except opset.OpSemanticsError:
        return 0
    count = math.prod(shape)
    if node.op_type in ("Gather", "GatherElements") and count:
        data, indices = np.asarray(inputs[0]), np.asarray(inputs[1])
        axis = node.attribute("axis", 0)
        axis = axis + data.ndim if axis < 0 else axis
        dim = data.shape[axis]
        bad = np.flatnonzero(((indices < -dim) | (indices >= dim)).ravel())
        if bad.size:
            j = int(bad[0])
            if node.op_type == "GatherElements":
                element = j  # the output has the indices' shape
            else:  # Y[a..., j..., b...] reads indices[j...]: the first is a = 0, b = 0
                at = np.unravel_index(j, indices.shape)
                multi = (0,) * axis + tuple(int(i) for i in at) + (0,) * (data.ndim - axis - 1)
                element = int(np.ravel_multi_index(multi, shape)) if shape else 0
            if _refused(node, inputs, element):
                return element
    return next((e for e in range(count) if _refused(node, inputs, e)), None)


def _refused(node: StepNode, inputs: Sequence[np.ndarray | None], element: int) -> bool:
    try:
        element_from_inputs(node, inputs, element)
    except opset.OpSemanticsError:
        return True
    return False
