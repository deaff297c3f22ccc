"""How the tests build lies: one element of an honest tensor changed, wrapping in its dtype
(a bool is flipped). Shared by the game, contract, provider and watchtower tests."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np

from optinfer.prover import commitments
from optinfer.prover.game import ModelTrace


def changed(tensor: np.ndarray, element: int = 0, delta: int = 1) -> np.ndarray:
    """A copy of `tensor` with flat element `element` moved by `delta` modulo its dtype's
    range (flipped for bool): always a different value, never a new dtype."""
    lie = tensor.copy()
    flat = lie.reshape(-1)
    if lie.dtype == bool:
        flat[element] = not flat[element]
    else:
        info = np.iinfo(lie.dtype)
        span = int(info.max) - int(info.min) + 1
        flat[element] = (int(flat[element]) - int(info.min) + delta) % span + int(info.min)
    return lie


# ------------------------------------------------------------------------------------------------
# Lies in structure: a provider's T_k with another header, another size, or bytes no honest
# encoder writes. Each is a data tree built over the bytes exactly as given (`forged_tree`), so
# non-canonical bytes and padding survive, which `TensorTree` would canonicalise away.
# ------------------------------------------------------------------------------------------------


def forged_tree(dtype, shape, data: bytes) -> commitments.TensorTree:
    """A `TensorTree` over ``data`` as given, under the header (``dtype``, ``shape``).

    ``data`` may differ from the canonical bytes of any tensor of that header: a bool byte
    above 1; bytes past the header's length (non-zero padding inside the last chunk, or whole
    chunks past it, which become non-ZERO leaves in the tree's padding). Its ``array`` is
    ``data`` cut or zero-extended to the header's length, viewed as ``dtype`` without
    normalising bools.
    """
    itemsize = commitments.numpy_dtype(dtype).itemsize
    count = math.prod(shape)
    body = bytes(data[:count * itemsize]).ljust(count * itemsize, b"\0")
    tree = object.__new__(commitments.TensorTree)
    tree.array = np.frombuffer(body, dtype=commitments.numpy_dtype(dtype)).reshape(shape)
    tree.data = memoryview(bytes(data))
    tree.levels = commitments.tree_levels(commitments.leaf_hashes(tree.data))
    tree.depth = len(tree.levels) - 1
    tree.data_root = tree.levels[-1][0]
    tree.root = commitments.tensor_root_from_data_root(dtype, shape, tree.data_root)
    return tree


def with_tree(trace: ModelTrace, k: int, tree: commitments.TensorTree,
              root: bytes | None = None) -> ModelTrace:
    """``trace`` with node k's output replaced by ``tree`` (kept as built: no re-encoding) and
    leaf k of the state tree set to ``root`` (default: the tree's own root). Every other root
    and data tree is the trace's own, reused, not recomputed."""
    commitment = copy.copy(trace.commitment)
    commitment.tensors = [*trace.commitment.tensors]
    commitment.tensors[k] = tree.array
    commitment.roots = [*trace.commitment.roots]
    commitment.roots[k] = tree.root if root is None else root
    commitment._trees = {**trace.commitment._trees, k: tree}
    commitment.state = commitments.StateTree()
    commitment.state.extend(commitment.roots)
    return ModelTrace(trace.committed, commitment)


STRUCTURAL_LIES = ("value", "dtype", "reshape", "empty", "empty_same_rank", "grow", "shrink",
                   "large", "noncanonical_bool", "padding_bytes", "padding_leaf",
                   "too_large_header", "no_preimage")
"""Each kind of lie `structural_lie` can tell about one honest tensor."""


def structural_lie(honest: np.ndarray, kind: str, rng: np.random.Generator
                   ) -> commitments.TensorTree | bytes:
    """A lie of ``kind`` about the honest tensor ``honest``: a forged data tree, or for
    ``no_preimage`` and ``too_large_header`` only a tensor root (which no reveal can open).

    Raises ValueError when ``kind`` does not apply to ``honest`` (a bool lie about an int)."""
    code = commitments.dtype_code(honest.dtype)
    data = bytes(commitments.tensor_data(honest))
    shape = tuple(honest.shape)
    if kind == "value":
        if honest.size == 0:
            raise ValueError("an empty tensor has no value to change")
        return commitments.TensorTree(changed(honest, int(rng.integers(honest.size)),
                                              int(rng.integers(1, 1000))))
    if kind == "dtype":
        other = next(d for d in (np.int64, np.int32, np.int8, np.uint8)
                     if np.dtype(d) != honest.dtype)
        return commitments.TensorTree(honest.astype(other))
    if kind == "reshape":  # the same bytes under another shape of as many elements
        reshaped = (*shape, 1) if rng.integers(2) or not shape else (math.prod(shape),)
        if reshaped == shape:
            reshaped = (1, *shape)
        return forged_tree(code, reshaped, data)
    if kind == "empty":
        return forged_tree(code, (0,), b"")
    if kind == "empty_same_rank":
        return forged_tree(code, (0, *shape[1:]) if shape else (0,), b"")
    if kind == "grow":  # one more element (or row) than the honest tensor
        grown = (shape[0] + 1, *shape[1:]) if shape else (2,)
        extra = commitments.numpy_dtype(code).itemsize * math.prod(grown) - len(data)
        return forged_tree(code, grown, data + rng.integers(0, 2, extra, np.uint8).tobytes())
    if kind == "shrink":
        if not shape or shape[0] == 0:
            raise ValueError("nothing to shrink")
        shrunk = (shape[0] - 1, *shape[1:])
        return forged_tree(code, shrunk, data[:len(data) - len(data) // shape[0]])
    if kind == "large":  # about 4 MiB: a descent several rounds deeper than any honest one
        rows = max(1, (4 << 20) // max(1, len(data)))
        return forged_tree(code, (rows, *shape) if shape else (rows,), data * rows)
    if kind == "noncanonical_bool":
        if honest.dtype != bool or honest.size == 0:
            raise ValueError("only a bool tensor has non-canonical bytes")
        forged = bytearray(data)
        forged[int(rng.integers(len(forged)))] = int(rng.integers(2, 256))
        return forged_tree(code, shape, bytes(forged))
    if kind == "padding_bytes":  # honest data, a non-zero byte in the last chunk's padding
        if len(data) % commitments.LEAF_BYTES == 0:
            raise ValueError("the last chunk has no padding")
        return forged_tree(code, shape, data + bytes([int(rng.integers(1, 256))]))
    if kind == "padding_leaf":  # honest data, then a whole non-zero chunk in the tree padding
        padded = data.ljust(commitments.leaf_count(len(data)) * commitments.LEAF_BYTES, b"\0")
        return forged_tree(code, shape, padded + b"\x01" * commitments.LEAF_BYTES)
    if kind == "too_large_header":  # 2**64 bytes: the reveal cannot be made
        huge = (2**61, 8) if code == 2 else (2**61,)
        return hashlib.sha256(commitments.tensor_header(code, huge)
                              + commitments.data_root(honest)).digest()
    if kind == "no_preimage":
        return rng.bytes(32)
    raise ValueError(f"unknown lie {kind!r}")


def lie_nodes(honest: ModelTrace, kind: str) -> list[int]:
    """The nodes below N (whose T_N the contract fixes from the claim) where a lie of ``kind``
    applies to ``honest``."""
    nodes = range(1, honest.node_count)
    if kind == "noncanonical_bool":
        return [k for k in nodes if honest.tensor(k).dtype == bool and honest.tensor(k).size]
    if kind == "padding_bytes":
        return [k for k in nodes if honest.tensor(k).nbytes % commitments.LEAF_BYTES]
    if kind in ("value", "shrink"):
        return [k for k in nodes if honest.tensor(k).size and honest.tensor(k).ndim]
    return list(nodes)


def lying_trace(honest: ModelTrace, k: int, lie: commitments.TensorTree | bytes) -> ModelTrace:
    """``honest`` with node k's output replaced by ``lie``; a bare root (a lie that cannot be
    revealed) replaces only leaf k's root, and the trace can still post every state root."""
    if isinstance(lie, commitments.TensorTree):
        return with_tree(honest, k, lie)
    return with_tree(honest, k, honest.tensor_tree(k), root=lie)
