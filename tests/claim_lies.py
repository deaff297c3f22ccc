"""Providers that answer claims the model has no answer for (issue 17 point 4): the traces
they defend with, for the game and watchtower tests."""

from __future__ import annotations

import numpy as np

from optinfer.prover.claims import claim_sequence
from optinfer.prover.game import ModelTrace
from optinfer.prover.one_step_prover import TraceCommitment


def oov_liar(model, honest: ModelTrace, prompt: list[int], output: list[int], *,
             read_as: int = 0, honest_prefix: bool = True, stand_in: bool = False
             ) -> ModelTrace:
    """A provider's trace of a claim whose sequence holds ids outside the vocabulary: the
    model run on the sequence with every such id read as `read_as`, under the claim's own
    leaf 0, ending in the claimed output. `honest_prefix`: the honest tensors before the
    refused node (the first lie is there; else it already lies where the ids are sliced out
    of the sequence). `stand_in`: at the refused node, the honest trace's own stand-in."""
    sequence = claim_sequence(prompt, output)
    tokens = sequence[1:]
    read = sequence.copy()
    read[1:][(tokens < 0) | (tokens >= model.vocab_size)] = read_as
    outputs = list(model.trace_sequence(read))
    k = honest.refusal.k
    if honest_prefix:
        outputs[:k - 1] = [honest.tensor(j) for j in range(1, k)]
    if stand_in:
        outputs[k - 1] = honest.tensor(k)
    outputs[-1] = np.asarray(output, np.int64)
    return ModelTrace(honest.committed, TraceCommitment(sequence, outputs))


def final_liar(honest: ModelTrace, output: list[int]) -> ModelTrace:
    """A provider honest to the last node, whose T_N is the claimed output (an id outside the
    vocabulary at its last position, which no argmax gives)."""
    return honest.with_output(honest.node_count, np.asarray(output, np.int64))
