"""Commitments: tensor roots, state roots and the Merkle proofs opened against them.

This module is the executable form of the "Commitments" part of ``docs/protocol.md``; every
byte it hashes is specified there and the Solidity verifier re-implements the same functions.
Pure Python + numpy + hashlib (SHA-256), no chain dependencies.

Vocabulary used throughout:

* *leaf chunk*: ``LEAF_BYTES`` (1024) bytes of a tensor's canonical data, the last one
  zero-padded; *leaf hash* = ``sha256(chunk)``.
* *tree*: leaves padded with ``ZERO`` (32 zero bytes) up to a power of two, internal node =
  ``sha256(left || right)``. Leaf hashes take 1024 bytes in and nodes 64 bytes, so a node can
  never be passed off as a leaf or the other way round.
* *height* of a node: 0 for leaves, +1 per level up; a tree of ``2**depth`` leaves has its
  root at height ``depth``.
* *path*: the sibling hashes from the leaf up to the root (bottom first); bit ``h`` of the
  leaf index says whether the node at height ``h`` is a right child (1) or a left child (0).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

LEAF_BYTES = 1024
"""Bytes per leaf chunk of a tensor's data (about what the EVM can re-hash cheaply per opening)."""

STATE_DEPTH = 16
"""The state tree has ``2**STATE_DEPTH`` leaf slots: tensor roots ``T_0 .. T_k``, then ZERO."""

ZERO = bytes(32)
"""The padding leaf, ``bytes32(0)``."""

HASH_BYTES = 32

# ONNX TensorProto.DataType codes of the only dtypes a committed tensor may have, keyed by
# (numpy kind, itemsize) so that byte order does not matter for the lookup.
_ONNX_CODE_BY_KIND: dict[tuple[str, int], int] = {
    ("u", 1): 2,  # uint8
    ("i", 1): 3,  # int8
    ("i", 4): 6,  # int32
    ("i", 8): 7,  # int64
    ("b", 1): 9,  # bool
}
DTYPE_CODES: dict[str, int] = {"uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9}
"""Allowed dtypes: name -> ONNX TensorProto code."""
_NUMPY_DTYPE_BY_CODE: dict[int, np.dtype] = {
    code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()
}

DTypeLike = int | str | np.dtype | type
"""An ONNX TensorProto code (int) or anything ``numpy.dtype()`` accepts."""


class ProofError(ValueError):
    """A proof or claimed value does not verify (the contract would revert)."""


def _sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------------------------------------
# Encodings
# ------------------------------------------------------------------------------------------------


def dtype_code(dtype: DTypeLike) -> int:
    """Return the ONNX TensorProto code of ``dtype``.

    ``dtype`` is either an ONNX code (an integer: 2, 3, 6, 7 or 9) or anything
    ``numpy.dtype()`` accepts (``np.int32``, ``"uint8"``, ``np.dtype(">i8")``...). Only uint8,
    int8, int32, int64 and bool are allowed; anything else raises ``ValueError`` naming it.
    """
    if isinstance(dtype, int | np.integer) and not isinstance(dtype, bool | np.bool_):
        if int(dtype) not in _NUMPY_DTYPE_BY_CODE:
            raise ValueError(
                f"unsupported ONNX dtype code {dtype}; allowed: {_allowed_dtypes_text()}"
            )
        return int(dtype)
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"unsupported tensor dtype {dtype!r}: {error}") from error
    code = _ONNX_CODE_BY_KIND.get((resolved.kind, resolved.itemsize))
    if code is None:
        raise ValueError(
            f"unsupported tensor dtype {resolved.name}; allowed: {_allowed_dtypes_text()}"
        )
    return code


def _allowed_dtypes_text() -> str:
    return ", ".join(f"{name} ({code})" for name, code in DTYPE_CODES.items())


def numpy_dtype(dtype: DTypeLike) -> np.dtype:
    """The little-endian numpy dtype of an allowed dtype (ONNX code or numpy dtype-like)."""
    return _NUMPY_DTYPE_BY_CODE[dtype_code(dtype)]


def _shape_tuple(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if len(dims) > 255:
        raise ValueError(f"tensor rank {len(dims)} does not fit the uint8 ndim field")
    for d in dims:
        if not 0 <= d < 2**64:
            raise ValueError(f"dimension {d} does not fit the uint64 dims field")
    return dims


MAX_TENSOR_BYTES = 2**64 - 1
"""Most data bytes a committed tensor may have (``Commitments.tensorByteLength``): the game
keeps a disputed data-tree node's index and the named element in 64-bit fields. Honest tensors
are far smaller; a provider that committed a larger header cannot reveal it and loses on time."""


def tensor_byte_length(dtype: DTypeLike, shape: Sequence[int]) -> int:
    """Number of bytes of the canonical data of a tensor: ``prod(shape) * itemsize``, at most
    ``MAX_TENSOR_BYTES`` (``TensorTooLarge`` on chain)."""
    byte_length = math.prod(_shape_tuple(shape)) * numpy_dtype(dtype).itemsize
    if byte_length > MAX_TENSOR_BYTES:
        raise ProofError(f"a tensor of {byte_length} data bytes exceeds {MAX_TENSOR_BYTES}")
    return byte_length


def canonical_array(array: npt.ArrayLike) -> np.ndarray:
    """Return ``array`` as a C-contiguous little-endian array of an allowed dtype.

    Bool elements become one byte 0/1 each (numpy bools are bytes already; normalised anyway so
    a bool array viewed from arbitrary bytes still encodes as 0/1). No copy when the input is
    already canonical.
    """
    array = np.asarray(array)
    target = numpy_dtype(array.dtype)  # raises ValueError for a disallowed dtype
    # np.asarray(order="C") rather than np.ascontiguousarray: the latter turns 0-d into 1-d.
    if target.kind == "b":
        raw = np.asarray(array, order="C").view(np.uint8)
        if raw.size and raw.max() > 1:
            return np.asarray(raw != 0, order="C")
        return np.asarray(array, order="C")
    return np.asarray(array, dtype=target, order="C")


def tensor_data(array: npt.ArrayLike) -> memoryview:
    """The canonical data bytes of a tensor (C order, little-endian, bool as 0/1), zero-copy."""
    flat = canonical_array(array).reshape(-1).view(np.uint8)
    return memoryview(flat)


def tensor_header(dtype: DTypeLike, shape: Sequence[int]) -> bytes:
    """``uint8 dtype || uint8 ndim || uint64 big-endian dim ...`` (abi.encodePacked layout)."""
    dims = _shape_tuple(shape)
    header = bytes([dtype_code(dtype), len(dims)])
    return header + b"".join(d.to_bytes(8, "big") for d in dims)


# ------------------------------------------------------------------------------------------------
# Generic Merkle trees
# ------------------------------------------------------------------------------------------------


def hash_pair(left: bytes, right: bytes) -> bytes:
    """An internal node: ``sha256(left || right)`` over exactly 64 bytes."""
    return _sha256(left + right)


def _zero_hashes(max_height: int) -> tuple[bytes, ...]:
    """``Z[h]``: the root of an all-ZERO subtree of height ``h`` (``Z[0] = ZERO``)."""
    zeros = [ZERO]
    for _ in range(max_height):
        zeros.append(hash_pair(zeros[-1], zeros[-1]))
    return tuple(zeros)


ZERO_HASHES = _zero_hashes(64)
"""``ZERO_HASHES[h]`` is the root of a subtree of height ``h`` whose leaves are all ZERO."""


def tree_depth(count: int) -> int:
    """Depth of the tree over ``count`` leaves: ``ceil(log2(count))``, 0 for one leaf."""
    if count < 1:
        raise ValueError("a tree has at least one leaf")
    return (count - 1).bit_length()


def _parent_level(level: Sequence[bytes]) -> list[bytes]:
    """Hash one level (even length) into the next one up."""
    sha256 = hashlib.sha256
    # Pairwise concatenation measured faster than slicing one joined buffer (0.6 vs 0.8 us/node).
    pairs = zip(level[0::2], level[1::2], strict=True)
    return [sha256(left + right).digest() for left, right in pairs]


def tree_levels(leaves: Sequence[bytes], depth: int | None = None) -> list[list[bytes]]:
    """All levels of the tree over ``leaves``, from the leaves (height 0) up to the root.

    ``leaves`` is padded with ZERO up to ``2**depth`` leaves; ``depth`` defaults to
    ``tree_depth(len(leaves))``. Level ``h`` has ``2**(depth - h)`` nodes; the last is
    ``[root]``. Padding leaves are materialised, so use a small depth (the state tree uses
    ``StateTree`` instead).
    """
    depth = tree_depth(len(leaves)) if depth is None else depth
    if len(leaves) > 2**depth:
        raise ValueError(f"{len(leaves)} leaves do not fit a tree of depth {depth}")
    level = list(leaves) + [ZERO] * (2**depth - len(leaves))
    levels = [level]
    while len(level) > 1:
        level = _parent_level(level)
        levels.append(level)
    return levels


def merkle_root(leaves: Sequence[bytes], depth: int | None = None) -> bytes:
    """Root of the tree over ``leaves`` padded with ZERO to ``2**depth`` (default: next power of
    two). A one-leaf tree's root is that leaf."""
    return tree_levels(leaves, depth)[-1][0]


def merkle_path(leaves: Sequence[bytes], index: int, depth: int | None = None) -> list[bytes]:
    """Sibling hashes (bottom first) proving ``leaves[index]`` against ``merkle_root(leaves,
    depth)``. ``index`` may point at a padding leaf (then the leaf proven is ZERO)."""
    levels = tree_levels(leaves, depth)
    if not 0 <= index < len(levels[0]):
        raise IndexError(f"leaf index {index} outside a tree of {len(levels[0])} leaves")
    return [level[(index >> height) ^ 1] for height, level in enumerate(levels[:-1])]


def root_from_path(leaf: bytes, index: int, path: Sequence[bytes]) -> bytes:
    """The root implied by ``leaf`` at ``index`` and its sibling ``path`` (bottom first).

    What the contract computes: at height ``h`` the running node is the right child when bit
    ``h`` of ``index`` is 1. ``index`` must be below ``2**len(path)`` (else ``ProofError``),
    so one path cannot be replayed for a different leaf slot.
    """
    if not 0 <= index < 2 ** len(path):
        raise ProofError(f"leaf index {index} outside a tree of depth {len(path)}")
    node = _check_hash(leaf, "leaf")
    for height, sibling in enumerate(path):
        sibling = _check_hash(sibling, f"sibling at height {height}")
        node = hash_pair(sibling, node) if (index >> height) & 1 else hash_pair(node, sibling)
    return node


def node_from_children(children: Sequence[bytes]) -> bytes:
    """Re-hash ``2**m`` consecutive nodes of one level into their common ancestor ``m`` levels up.

    Used by the n-ary element descent: the provider reveals the children of a disputed node
    (from ``subtree_roots``) and the verifier checks them against that node with this.
    """
    count = len(children)
    if count < 1 or count & (count - 1):
        raise ProofError(f"{count} children: a descent step reveals a power of two")
    for position, child in enumerate(children):
        _check_hash(child, f"child {position}")
    return merkle_root(children)


def _check_hash(value: bytes, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_BYTES:
        raise ProofError(f"{what} must be {HASH_BYTES} bytes")
    return bytes(value)


# ------------------------------------------------------------------------------------------------
# Model root and model id
# ------------------------------------------------------------------------------------------------


def model_root(nodes_root: bytes, constants_root: bytes, opset_version: int,
               node_count: int) -> bytes:
    """A model's root, the commitment of its graph: ``sha256(nodes_root || constants_root ||
    uint32 opset || uint32 node_count)``, big-endian (``Commitments.modelRoot``). The
    manifest's ``model_root``; :func:`model_id` hashes it into the id the registry keys by."""
    return _sha256(_check_hash(nodes_root, "nodes_root") + _check_hash(constants_root,
                                                                        "constants_root")
                   + struct.pack(">II", opset_version, node_count))


def model_id(root: bytes, manifest_hash: bytes, max_context: int,
             eos_token_ids: Sequence[int], sampling: bool = False) -> bytes:
    """A registered model's id, what requests name: ``sha256(model_root || manifest_hash ||
    uint32 max_context || uint32 len(eos) || uint32 eos_0 || ... || uint8 sampling)``,
    big-endian (``ModelRegistry.modelIdOf``; docs/protocol.md, "Model id").

    `root` is the graph's :func:`model_root` (both roots, op set, node count). The id binds
    it, the manifest published with it, the context the coordinator admits requests by, the
    EOS ids it judges answer endings by and whether the graph samples (the layout of a
    dispute's leaf 0): everything that decides the model's behaviour.
    A registration of the same graph with other values is another model with another id, so
    nobody can occupy a model's id with words of their own. The manifest URI is not in it: it
    says where to fetch, not what runs (every fetched byte is checked against the manifest
    hash and the roots), and with it one model published at two places would be two models.
    """
    if any(not 0 <= v < 2**32 for v in (max_context, *eos_token_ids)):
        raise ProofError("max_context and the EOS token ids must be uint32")
    return _sha256(_check_hash(root, "model_root") + _check_hash(manifest_hash, "manifest_hash")
                   + struct.pack(f">II{len(eos_token_ids)}IB", max_context, len(eos_token_ids),
                                 *eos_token_ids, int(bool(sampling))))


# ------------------------------------------------------------------------------------------------
# Tensor roots
# ------------------------------------------------------------------------------------------------


def leaf_count(byte_length: int) -> int:
    """Number of leaf chunks of ``byte_length`` data bytes (an empty tensor has one)."""
    return max(1, -(-byte_length // LEAF_BYTES))


def leaf_hashes(data: bytes | memoryview) -> list[bytes]:
    """``sha256`` of each 1024-byte chunk of ``data``; the last chunk zero-padded to 1024 bytes,
    one all-zero chunk for empty data.

    The hot loop of the prover: full chunks are hashed straight from memoryview slices (no
    copies); only the final partial chunk is copied to pad it.
    """
    view = memoryview(data).cast("B")
    full_end = len(view) - len(view) % LEAF_BYTES
    sha256 = hashlib.sha256
    hashes = [sha256(view[i : i + LEAF_BYTES]).digest() for i in range(0, full_end, LEAF_BYTES)]
    if full_end < len(view) or not hashes:
        hashes.append(sha256(bytes(view[full_end:]).ljust(LEAF_BYTES, b"\0")).digest())
    return hashes


def data_root(array: npt.ArrayLike) -> bytes:
    """Root of the Merkle tree over the leaf hashes of the tensor's canonical data."""
    return merkle_root(leaf_hashes(tensor_data(array)))


def tensor_root_from_data_root(dtype: DTypeLike, shape: Sequence[int], root: bytes) -> bytes:
    """``sha256(uint8 dtype || uint8 ndim || uint64be dims... || data_root)``."""
    return _sha256(tensor_header(dtype, shape) + _check_hash(root, "data root"))


def tensor_root(array: npt.ArrayLike) -> bytes:
    """The tensor root ``T`` of ``array``: its data root bound to its dtype code and shape."""
    canonical = canonical_array(array)
    return tensor_root_from_data_root(canonical.dtype, canonical.shape, data_root(canonical))


def data_tree_depth(dtype: DTypeLike, shape: Sequence[int]) -> int:
    """Depth of a tensor's data tree (0 when the data fits one leaf chunk)."""
    return tree_depth(leaf_count(tensor_byte_length(dtype, shape)))


def element_byte_range(dtype: DTypeLike, shape: Sequence[int], flat_index: int) -> tuple[int, int]:
    """The ``[start, end)`` byte range of element ``flat_index`` (C order) in the canonical data.

    Elements never straddle leaves: 1024 is a multiple of every allowed itemsize.
    """
    count = math.prod(_shape_tuple(shape))
    if not 0 <= flat_index < count:
        raise IndexError(f"element {flat_index} outside a tensor of {count} elements")
    itemsize = numpy_dtype(dtype).itemsize
    return flat_index * itemsize, (flat_index + 1) * itemsize


def decode_elements(dtype: DTypeLike, data: bytes) -> np.ndarray:
    """Decode canonical bytes (whole elements) into a 1-D numpy array of ``dtype``."""
    target = numpy_dtype(dtype)
    if target.kind == "b":
        raw = np.frombuffer(data, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise ProofError("a bool element byte must be 0 or 1")
        return raw.astype(bool)
    return np.frombuffer(data, dtype=target).copy()


# ------------------------------------------------------------------------------------------------
# Range proofs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RangeProof:
    """Opening of a contiguous byte range of a tensor.

    ``chunks``: the covering leaf chunks, concatenated, each exactly ``LEAF_BYTES`` (the last
    chunk of the tensor carries its zero padding). ``siblings``: the multiproof hashes in the
    order ``verify_tensor_range`` consumes them: for each height from 0 up, first the left
    boundary sibling (if the range's first node there is a right child), then the right boundary
    sibling (if its last node is a left child).
    """

    chunks: bytes
    siblings: tuple[bytes, ...]


def _covering_leaves(byte_length: int, byte_start: int, byte_end: int) -> tuple[int, int]:
    """First and last (inclusive) leaf index covering ``[byte_start, byte_end)``."""
    if not 0 <= byte_start < byte_end <= byte_length:
        raise ProofError(
            f"byte range [{byte_start}, {byte_end}) is empty or outside a tensor of "
            f"{byte_length} bytes"
        )
    return byte_start // LEAF_BYTES, (byte_end - 1) // LEAF_BYTES


def _boundary_positions(first: int, last: int, depth: int) -> list[tuple[int, int, bool]]:
    """Where the multiproof of leaves ``[first, last]`` needs siblings, in proof order:
    ``(height, node index, is_left_boundary)``. Shared by prover and verifier."""
    positions = []
    for height in range(depth):
        if first & 1:
            positions.append((height, first - 1, True))
        if not last & 1:
            positions.append((height, last + 1, False))
        first, last = first >> 1, last >> 1
    return positions


class TensorTree:
    """A tensor with its data tree built once: a prover answers many openings of one tensor
    (descent rounds, then a range proof) without re-hashing it each time."""

    def __init__(self, array: npt.ArrayLike) -> None:
        self.array = canonical_array(array)
        self.data = tensor_data(self.array)
        self.levels = tree_levels(leaf_hashes(self.data))
        """``levels[h]``: all nodes at height ``h``, padding included; ``levels[-1] == [root]``."""
        self.depth = len(self.levels) - 1
        self.data_root = self.levels[-1][0]
        self.root = tensor_root_from_data_root(self.array.dtype, self.array.shape, self.data_root)

    def subtree_roots(self, height: int) -> list[bytes]:
        """The hashes of all nodes at ``height`` of the data tree, left to right.

        Height 0 gives the leaf hashes followed by the ZERO padding leaves; height ``depth``
        gives ``[data_root]``. Always ``2**(depth - height)`` entries, padding nodes included,
        so any ``2**m`` aligned neighbours re-hash to their ancestor with ``node_from_children``.
        """
        if not 0 <= height <= self.depth:
            raise ValueError(f"height {height} outside a data tree of depth {self.depth}")
        return list(self.levels[height])

    def range_proof(self, byte_start: int, byte_end: int) -> RangeProof:
        """Prove bytes ``[byte_start, byte_end)`` of the canonical data (a non-empty range)."""
        first, last = _covering_leaves(len(self.data), byte_start, byte_end)
        chunk_bytes = bytes(self.data[first * LEAF_BYTES : (last + 1) * LEAF_BYTES])
        chunk_bytes = chunk_bytes.ljust((last - first + 1) * LEAF_BYTES, b"\0")
        siblings = tuple(
            self.levels[height][index]
            for height, index, _ in _boundary_positions(first, last, self.depth)
        )
        return RangeProof(chunks=chunk_bytes, siblings=siblings)


def subtree_roots(array: npt.ArrayLike, height: int) -> list[bytes]:
    """``TensorTree(array).subtree_roots(height)``: all node hashes at ``height`` of the data tree
    (padding nodes included), for the n-ary element descent."""
    return TensorTree(array).subtree_roots(height)


def tensor_range_proof(array: npt.ArrayLike, byte_start: int, byte_end: int) -> RangeProof:
    """``TensorTree(array).range_proof(byte_start, byte_end)``: prove a non-empty byte range."""
    return TensorTree(array).range_proof(byte_start, byte_end)


def verify_tensor_range(
    root: bytes,
    dtype: DTypeLike,
    shape: Sequence[int],
    byte_start: int,
    byte_end: int,
    proof: RangeProof,
) -> bytes:
    """Check ``proof`` against the tensor root ``root`` of a tensor of ``dtype`` and ``shape``.

    Returns the verified bytes ``[byte_start, byte_end)`` of the canonical data, or raises
    ``ProofError``. Mirrors the contract: derive the covering leaves and the tree depth from the
    shape, hash each chunk, fold the range upwards consuming boundary siblings in order, require
    every sibling used, then rebuild the tensor root from the header and the data root.
    """
    depth = data_tree_depth(dtype, shape)
    first, last = _covering_leaves(tensor_byte_length(dtype, shape), byte_start, byte_end)
    if len(proof.chunks) != (last - first + 1) * LEAF_BYTES:
        raise ProofError(
            f"range proof carries {len(proof.chunks)} chunk bytes, expected "
            f"{(last - first + 1) * LEAF_BYTES}"
        )
    nodes = leaf_hashes(proof.chunks)
    siblings = iter(proof.siblings)
    expected_siblings = len(_boundary_positions(first, last, depth))
    if len(proof.siblings) != expected_siblings:
        raise ProofError(
            f"range proof carries {len(proof.siblings)} siblings, expected {expected_siblings}"
        )
    for height in range(depth):
        if first & 1:
            nodes.insert(0, _check_hash(next(siblings), f"left sibling at height {height}"))
            first -= 1
        if not last & 1:
            nodes.append(_check_hash(next(siblings), f"right sibling at height {height}"))
            last += 1
        nodes = _parent_level(nodes)
        first, last = first >> 1, last >> 1
    if tensor_root_from_data_root(dtype, shape, nodes[0]) != root:
        raise ProofError("range proof does not match the tensor root")
    offset = (byte_start // LEAF_BYTES) * LEAF_BYTES
    return proof.chunks[byte_start - offset : byte_end - offset]


def claimed_element(dtype: DTypeLike, data: bytes) -> int:
    """The value of one element of a provider's ``T_k`` as the one-step reads it: little-endian
    two's complement, a bool as its byte. A bool byte other than 0x00/0x01 is not canonical; it
    decodes to a value (2..255) that no op computes, so the one-step judges it a wrong element
    (the provider's fault) rather than a malformed witness that would stop the dispute."""
    itemsize = numpy_dtype(dtype).itemsize
    if len(data) != itemsize:
        raise ProofError(f"an element of this dtype is {itemsize} bytes, not {len(data)}")
    if numpy_dtype(dtype).kind == "b":
        return data[0]
    return int(decode_elements(dtype, data)[0])


# ------------------------------------------------------------------------------------------------
# Element descent
# ------------------------------------------------------------------------------------------------


def verify_descent_step(
    node: bytes,
    node_height: int,
    node_index: int,
    children: Sequence[bytes],
    dtype: DTypeLike,
    shape: Sequence[int],
) -> None:
    """Check one n-ary descent step in the data tree of a tensor of ``dtype`` and ``shape``.

    ``node`` is the agreed node at ``node_height`` with index ``node_index`` in its level;
    ``children`` are its ``2**m`` descendants at height ``node_height - m``, left to right.
    They must rehash to ``node``, and every child lying wholly past the tensor's last leaf must
    be the all-ZERO subtree ``Z[node_height - m]`` (so a lie in the padding is caught here, not
    deferred to a chunk that does not exist). Raises ``ProofError``.
    """
    depth = data_tree_depth(dtype, shape)
    if not 0 < node_height <= depth or not 0 <= node_index < 2 ** (depth - node_height):
        raise ProofError(f"no node ({node_height}, {node_index}) above the leaves of this tree")
    fan_out_bits = len(children).bit_length() - 1
    if not 1 <= fan_out_bits <= node_height:
        raise ProofError(f"{len(children)} children cannot sit under a node at {node_height}")
    if node_from_children(children) != node:
        raise ProofError("the children do not rehash to the node")
    child_height = node_height - fan_out_bits
    leaves = leaf_count(tensor_byte_length(dtype, shape))
    for position, child in enumerate(children):
        first_leaf = ((node_index << fan_out_bits) + position) << child_height
        if first_leaf >= leaves and child != ZERO_HASHES[child_height]:
            raise ProofError(f"child {position} lies in the padding but is not Z[{child_height}]")


def verify_leaf_chunk(
    leaf: bytes, leaf_index: int, chunk: bytes, dtype: DTypeLike, shape: Sequence[int]
) -> bytes:
    """Check the chunk revealed at the bottom of a descent against the disputed leaf hash.

    ``leaf_index`` must be a real chunk of the tensor, ``chunk`` exactly ``LEAF_BYTES`` with
    ``sha256(chunk) == leaf`` and zeros past the tensor's end. Returns the chunk's data bytes
    (padding stripped); raises ``ProofError``.
    """
    byte_length = tensor_byte_length(dtype, shape)
    if not 0 <= leaf_index < leaf_count(byte_length):
        raise ProofError(f"leaf {leaf_index} is not a chunk of a {byte_length}-byte tensor")
    if len(chunk) != LEAF_BYTES or _sha256(chunk) != _check_hash(leaf, "leaf"):
        raise ProofError("the chunk does not hash to the leaf")
    data_end = min(LEAF_BYTES, byte_length - leaf_index * LEAF_BYTES)
    if any(chunk[data_end:]):
        raise ProofError("the chunk's padding is not zero")
    return bytes(chunk[:data_end])


# ------------------------------------------------------------------------------------------------
# State roots
# ------------------------------------------------------------------------------------------------


class StateTree:
    """The state tree: tensor roots ``T_0 .. T_k`` at leaves ``0 .. k``, ZERO elsewhere, in a
    tree of fixed capacity ``2**depth``; its root after leaf ``k`` is the state root ``S_k``.

    ``append`` costs ``depth`` hashes. For every leaf ``m`` the tree keeps the nodes on ``m``'s
    path to the root just after ``m`` was appended (``depth + 1`` hashes per leaf), which is
    enough to rebuild any node of any earlier state: at state ``k`` a node whose leaves start
    after ``k`` is an all-ZERO subtree, and otherwise it equals its value just after its last
    leaf at or below ``k`` was appended (later leaves do not touch it until then).
    """

    def __init__(self, depth: int = STATE_DEPTH) -> None:
        if not 1 <= depth <= 64:
            raise ValueError(f"state tree depth {depth} outside 1..64")
        self.depth = depth
        self.capacity = 2**depth
        # _ancestors[m][h]: node at height h above leaf m, just after leaf m was appended.
        self._ancestors: list[list[bytes]] = []

    def __len__(self) -> int:
        """Number of leaves appended so far (the current state is ``len(tree) - 1``)."""
        return len(self._ancestors)

    def append(self, leaf: bytes) -> bytes:
        """Set the next leaf slot to ``leaf`` (a tensor root) and return the new state root."""
        index = len(self._ancestors)
        if index >= self.capacity:
            raise ValueError(f"state tree is full ({self.capacity} leaves)")
        node = _check_hash(leaf, "state leaf")
        ancestors = [node]
        for height in range(self.depth):
            sibling = self._node(height, (index >> height) ^ 1, index)
            node = hash_pair(sibling, node) if (index >> height) & 1 else hash_pair(node, sibling)
            ancestors.append(node)
        self._ancestors.append(ancestors)
        return node

    def extend(self, leaves: Sequence[bytes]) -> list[bytes]:
        """Append each leaf; return the state root after each append."""
        return [self.append(leaf) for leaf in leaves]

    def root(self, state: int | None = None) -> bytes:
        """``S_state`` (default: the latest). ``state = -1`` is the empty tree."""
        state = self._check_state(len(self) - 1 if state is None else state)
        return self._node(self.depth, 0, state)

    def leaf(self, index: int, state: int | None = None) -> bytes:
        """Leaf ``index`` at ``state`` (default latest): ``T_index`` or ZERO."""
        state = self._check_state(len(self) - 1 if state is None else state)
        self._check_index(index)
        return self._node(0, index, state)

    def path(self, index: int, state: int | None = None) -> list[bytes]:
        """Sibling path (bottom first) of leaf ``index`` in the tree at ``state`` (default latest).

        ``index`` may exceed ``state`` (the leaf is then ZERO): the path of leaf ``k`` at state
        ``k - 1`` is the one ``verify_leaf_update`` takes to move from ``S_{k-1}`` to ``S_k``;
        it equals the path at state ``k`` because no sibling of leaf ``k`` contains leaf ``k``.
        """
        state = self._check_state(len(self) - 1 if state is None else state)
        self._check_index(index)
        return [self._node(h, (index >> h) ^ 1, state) for h in range(self.depth)]

    def _node(self, height: int, node_index: int, state: int) -> bytes:
        first_leaf = node_index << height
        if first_leaf > state:
            return ZERO_HASHES[height]
        last_leaf_in_state = min(state, first_leaf + (1 << height) - 1)
        return self._ancestors[last_leaf_in_state][height]

    def _check_state(self, state: int) -> int:
        if not -1 <= state < len(self):
            raise IndexError(f"state {state} outside -1..{len(self) - 1}")
        return state

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.capacity:
            raise IndexError(f"leaf index {index} outside the state tree's {self.capacity} slots")


def state_root(tensor_roots: Sequence[bytes], depth: int = STATE_DEPTH) -> bytes:
    """``S_k`` for ``tensor_roots = [T_0 .. T_k]`` (one-shot; ``StateTree`` for every k)."""
    tree = StateTree(depth)
    tree.extend(tensor_roots)
    return tree.root()


def verify_leaf_update(
    state_prev: bytes, state_next: bytes, index: int, leaf: bytes, path: Sequence[bytes]
) -> None:
    """Check that ``state_next`` is ``state_prev`` with leaf ``index`` changed from ZERO to
    ``leaf``, both proven with the same sibling ``path`` (length ``STATE_DEPTH``).

    The step-4 check of the dispute game (``S_k`` from ``S_{k-1}`` and ``T_k``). Requiring the
    old leaf to be ZERO keeps a state from overwriting a tensor it already committed. Raises
    ``ProofError`` when any part does not hold.
    """
    if len(path) != STATE_DEPTH:
        raise ProofError(f"state path has {len(path)} siblings, expected {STATE_DEPTH}")
    if _check_hash(leaf, "leaf") == ZERO:
        raise ProofError("a tensor root cannot be ZERO")
    if root_from_path(ZERO, index, path) != state_prev:
        raise ProofError(f"leaf {index} is not an empty slot of the previous state")
    if root_from_path(leaf, index, path) != state_next:
        raise ProofError(f"the next state is not the previous one with leaf {index} set")
