"""The Solidity commitments library (contracts/src/lib/) against `optinfer.prover.commitments`.

Everything runs through `CommitmentsHarness` on the session's anvil: the worked examples of
docs/protocol.md, random tensors (Hypothesis + seeded numpy) whose on-chain roots and proofs must
equal the Python reference's byte for byte, and tampered proofs that must revert with the custom
error named after the broken rule. The harness is stateless (only eth_calls), so it is deployed
once per session and needs no snapshot.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.commitments_binding import CommitmentsHarness
from optinfer.prover import commitments as ref
from optinfer.prover.commitments import (
    LEAF_BYTES,
    STATE_DEPTH,
    ZERO,
    ZERO_HASHES,
    RangeProof,
    StateTree,
    TensorTree,
)
from tests.profiles import examples

# Each Hypothesis example costs a few JSON-RPC round trips: keep the counts modest.
CHAIN_SETTINGS = settings(
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DTYPES = ["uint8", "int8", "int32", "int64", "bool"]


@pytest.fixture(scope="session")
def harness(chain, w3) -> CommitmentsHarness:
    return CommitmentsHarness.deploy(w3, chain.accounts[0])


def expect_revert(action, error_name: str) -> ContractRevert:
    """Run `action`; require a revert decoded as the custom error `error_name`."""
    with pytest.raises(ContractRevert) as caught:
        action()
    assert caught.value.name == error_name, (caught.value.name, caught.value.data.hex())
    return caught.value


def random_tensor(seed: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded values covering each dtype's whole range (bool as 0/1)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def flip(data: bytes, position: int) -> bytes:
    """`data` with one bit of byte `position` flipped."""
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


# ------------------------------------------------------------------------------------------------
# Worked examples (docs/protocol.md)
# ------------------------------------------------------------------------------------------------

T_A = bytes.fromhex("73cc85d1671a15d03be33b5bb3680f83a462675d595664b455e239e7ac32f250")
T_B = bytes.fromhex("32a978e00075b8bc46324c30dc26a4e04a214a9c552349f57d6966d23dff4edc")
N01 = bytes.fromhex("e9285b7aaefb197f028bda93e0a417c19175c8c6708fac443594759c2446d5f0")
N23 = bytes.fromhex("4774b0a881314a2abe435e17c25b2573cdd424fc334ed53a221c3109665e8165")
EXAMPLE_B_DATA = b"\x01" * 1024 + b"\x02" * 1024 + b"\x03" * 952


def test_workedExampleA_int32Vector_sameHexOnChain(harness):
    data = bytes.fromhex("010000000200000003000000")
    assert harness.tensor_header(6, [3]).hex() == "06010000000000000003"
    assert harness.leaf_hash(data.ljust(LEAF_BYTES, b"\0")).hex() == (
        "e40ced6302182dee05594c77e10da77674463357a79097ece14010cd4d7588ec"
    )
    assert harness.tensor_root(6, [3], data) == T_A


def test_workedExampleB_threeChunks_sameHexOnChain(harness):
    leaf_0, leaf_1 = harness.leaf_hash(b"\x01" * 1024), harness.leaf_hash(b"\x02" * 1024)
    assert harness.hash_pair(leaf_0, leaf_1) == N01
    assert harness.data_root(EXAMPLE_B_DATA).hex() == (
        "4f570eb8b59bc5f15eb661319ff74c4789b1a524419333d1e07d3a1bfb9b4411"
    )
    assert harness.tensor_header(2, [3000]).hex() == "02010000000000000bb8"
    assert harness.tensor_root(2, [3000], EXAMPLE_B_DATA) == T_B


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "header", "root"),
    [
        (7, [0], b"", "07010000000000000000",
         "b6cc9c36f35d17edc47689bcbfb0421192a8c1d1814d8dd872cbccc738b4276b"),
        (3, [], b"\xff", "0300",
         "13187a349055cc1c7f4dae67745291ddb54532edd97ae223dd7357dfb0170b76"),
        (9, [2, 2], b"\x01\x00\x00\x01", "090200000000000000020000000000000002",
         "074ab6efa07c6c21a250af4ad2c84bbce75e838762f003730ec80c40440f3f70"),
    ],
)
def test_workedEdgeCases_emptyScalarBool_sameHexOnChain(harness, dtype, shape, data, header, root):
    assert harness.tensor_header(dtype, shape).hex() == header
    assert harness.tensor_root(dtype, shape, data).hex() == root


def test_leafHash_notOneChunk_reverts(harness):
    expect_revert(lambda: harness.leaf_hash(bytes(1023)), "LeafChunkLengthMismatch")


def test_workedExample_emptyDataRoot_isHashOfZeroChunk(harness):
    assert harness.data_root(b"").hex() == (
        "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    )


def test_workedExample_stateRoots_S0S1_sameHexOnChain(harness):
    z = [harness.zero_hash(h) for h in range(STATE_DEPTH + 1)]
    assert z[1].hex() == "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"
    assert z[16].hex() == "8fe6b1689256c0d385f42f5bbe2027a22c1996e110ba97c171d3e5948de92beb"
    s0 = harness.root_from_path(T_A, 0, z[:STATE_DEPTH])
    assert s0.hex() == "6bbdd8a526d642c333a74f0496830e06252fb8df2525753fc50ee2c9f77c4a44"
    path_1 = [T_A, *z[1:STATE_DEPTH]]
    s1 = harness.root_from_path(T_B, 1, path_1)
    assert s1.hex() == "f03583bc46af01149269c324c518d066d10d1bab79b2cb6fb64d5ae6f38ab3d4"
    # The two appends as step-4 moves: S_{-1} -> S_0 -> S_1.
    harness.verify_leaf_update(z[16], s0, 0, T_A, z[:STATE_DEPTH])
    harness.verify_leaf_update(s0, s1, 1, T_B, path_1)


def test_workedExample_rangeProofs_returnSpecBytes(harness):
    chunks = b"\x01" * 1024 + b"\x02" * 1024
    opened = harness.verify_tensor_range(T_B, 2, [3000], 1000, 1100, RangeProof(chunks, (N23,)))
    assert opened == b"\x01" * 24 + b"\x02" * 76
    last = RangeProof(b"\x03" * 952 + bytes(72), (ZERO, N01))
    assert harness.verify_tensor_range(T_B, 2, [3000], 2999, 3000, last) == b"\x03"


def test_zeroHash_tableAndLoop_matchReference(harness):
    # 0..32 come from the table, above that from hashing upwards.
    for height in [*range(0, 34), 40, 54, 64]:
        assert harness.zero_hash(height) == ZERO_HASHES[height], height


@CHAIN_SETTINGS
@given(depth=st.integers(0, 20), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_rootFromPath_randomPaths_equalReference(harness, depth, seed, data):
    rng = np.random.default_rng(seed)
    leaf, path = rng.bytes(32), [rng.bytes(32) for _ in range(depth)]
    index = data.draw(st.integers(0, 2**depth - 1), label="index")
    assert harness.root_from_path(leaf, index, path) == ref.root_from_path(leaf, index, path)
    err = expect_revert(lambda: harness.root_from_path(leaf, index + 2**depth, path),
                        "LeafIndexOutsideTree")
    assert err.args_decoded == (index + 2**depth, depth)
    nodes = [rng.bytes(32) for _ in range(2 ** min(depth, 6))]
    assert harness.root_of_nodes(nodes) == ref.node_from_children(nodes)


# ------------------------------------------------------------------------------------------------
# Tensor roots
# ------------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@CHAIN_SETTINGS
@given(dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_tensorRoot_randomTensors_equalReference(harness, dtype, shape, seed):
    array = random_tensor(seed, dtype, shape)
    data = bytes(ref.tensor_data(array))
    assert harness.tensor_header(dtype, shape) == ref.tensor_header(dtype, shape)
    assert harness.tensor_byte_length(dtype, shape) == len(data)
    assert harness.data_tree_depth(dtype, shape) == ref.data_tree_depth(dtype, shape)
    assert harness.tensor_root(dtype, shape, data) == ref.tensor_root(array)


@CHAIN_SETTINGS
@given(byte_length=st.integers(0, 9 * LEAF_BYTES), seed=st.integers(0, 2**32 - 1))
def test_dataRoot_multiChunkData_equalsReference(harness, byte_length, seed):
    array = random_tensor(seed, "uint8", (byte_length,))
    assert harness.data_root(array.tobytes()) == ref.data_root(array)


def test_tensorRoot_unsupportedDtypeOrHugeOrWrongLength_reverts(harness):
    expect_revert(lambda: harness.tensor_header(1, [3]), "UnsupportedDtype")  # float32
    expect_revert(lambda: harness.tensor_header(6, [1] * 256), "TensorRankTooLarge")
    expect_revert(lambda: harness.tensor_byte_length(7, [2**32, 2**29]), "TensorTooLarge")
    expect_revert(lambda: harness.tensor_root(6, [3], bytes(11)), "TensorDataLengthMismatch")
    # A zero dimension empties the tensor even when the other dimensions overflow together.
    assert harness.tensor_byte_length(7, [2**63, 2**63, 0]) == 0


# ------------------------------------------------------------------------------------------------
# Range proofs
# ------------------------------------------------------------------------------------------------


@st.composite
def range_cases(draw):
    """A tensor of up to ~9 chunks and a non-empty byte range of whole elements in it."""
    dtype = draw(st.sampled_from(DTYPES))
    itemsize = np.dtype(dtype).itemsize
    count = draw(st.integers(1, 9 * LEAF_BYTES // itemsize))
    rows = draw(st.sampled_from([d for d in (1, 2, 3, 4) if count % d == 0]))
    shape = (rows, count // rows)
    first = draw(st.integers(0, count - 1))
    last = draw(st.integers(first, min(count - 1, first + 3 * LEAF_BYTES // itemsize)))
    seed = draw(st.integers(0, 2**32 - 1))
    return random_tensor(seed, dtype, shape), first * itemsize, (last + 1) * itemsize


@CHAIN_SETTINGS
@given(case=range_cases(), data=st.data())
def test_verifyTensorRange_randomProofs_openSameBytes_andTamperingReverts(harness, case, data):
    array, start, end = case
    tree = TensorTree(array)
    dtype, shape = array.dtype, array.shape
    proof = tree.range_proof(start, end)
    expected = ref.verify_tensor_range(tree.root, dtype, shape, start, end, proof)
    assert harness.verify_tensor_range(tree.root, dtype, shape, start, end, proof) == expected

    def verify(root=tree.root, dtype=dtype, shape=shape, start=start, end=end, proof=proof):
        return lambda: harness.verify_tensor_range(root, dtype, shape, start, end, proof)

    byte = data.draw(st.integers(0, len(proof.chunks) - 1), label="tampered chunk byte")
    expect_revert(verify(proof=RangeProof(flip(proof.chunks, byte), proof.siblings)),
                  "RangeProofRootMismatch")
    if proof.siblings:
        which = data.draw(st.integers(0, len(proof.siblings) - 1), label="tampered sibling")
        siblings = list(proof.siblings)
        siblings[which] = flip(siblings[which], data.draw(st.integers(0, 31)))
        expect_revert(verify(proof=RangeProof(proof.chunks, tuple(siblings))),
                      "RangeProofRootMismatch")
        expect_revert(verify(proof=RangeProof(proof.chunks, proof.siblings[:-1])),
                      "RangeSiblingCountMismatch")
    expect_revert(verify(proof=RangeProof(proof.chunks, (*proof.siblings, ZERO))),
                  "RangeSiblingCountMismatch")
    expect_revert(verify(root=flip(tree.root, 0)), "RangeProofRootMismatch")
    # Same bytes under another shape (same length, so the same counts): another header.
    expect_revert(verify(shape=(1, *shape)), "RangeProofRootMismatch")
    expect_revert(verify(proof=RangeProof(proof.chunks[:-1], proof.siblings)),
                  "RangeChunksLengthMismatch")
    expect_revert(verify(end=array.nbytes + 1), "InvalidByteRange")
    expect_revert(verify(end=start), "InvalidByteRange")


def test_verifyTensorRange_otherDtypeSameItemsize_reverts(harness):
    array = random_tensor(7, "uint8", (3000,))
    proof = ref.tensor_range_proof(array, 5, 9)
    expect_revert(lambda: harness.verify_tensor_range(ref.tensor_root(array), "int8", [3000], 5, 9,
                                                      proof), "RangeProofRootMismatch")


# ------------------------------------------------------------------------------------------------
# State leaf update (step 4)
# ------------------------------------------------------------------------------------------------


@CHAIN_SETTINGS
@given(count=st.integers(1, 40), data=st.data())
def test_verifyLeafUpdate_honestMoveAccepted_liesRejected(harness, count, data):
    rng = np.random.default_rng(count)
    tree = StateTree()
    tree.extend([rng.bytes(32) for _ in range(count)])
    k = data.draw(st.integers(0, count - 1), label="k")
    prev, nxt, leaf = tree.root(k - 1), tree.root(k), tree.leaf(k)
    path = tree.path(k, k - 1)
    ref.verify_leaf_update(prev, nxt, k, leaf, path)
    harness.verify_leaf_update(prev, nxt, k, leaf, path)

    expect_revert(lambda: harness.verify_leaf_update(prev, nxt, k, flip(leaf, 31), path),
                  "StateUpdateMismatch")
    # The honest path at the wrong slot: the spec's first failing equation names the error (in
    # the empty tree every slot is empty, so only the second one fails there).
    slot_empty = ref.root_from_path(ZERO, k + 1, path) == prev
    expect_revert(lambda: harness.verify_leaf_update(prev, nxt, k + 1, leaf, path),
                  "StateUpdateMismatch" if slot_empty else "StateSlotNotEmpty")
    expect_revert(lambda: harness.verify_leaf_update(prev, nxt, k, ZERO, path), "ZeroTensorRoot")
    expect_revert(lambda: harness.verify_leaf_update(prev, nxt, k, leaf, path[:-1]),
                  "StatePathLengthMismatch")
    expect_revert(lambda: harness.verify_leaf_update(prev, nxt, k + 2**16, leaf, path),
                  "LeafIndexOutsideTree")
    if k > 0:
        # Overwriting an occupied slot: leaf j < k already holds T_j in S_k.
        j = data.draw(st.integers(0, k - 1), label="occupied slot")
        other = rng.bytes(32)
        overwritten = ref.root_from_path(other, j, tree.path(j, k))
        expect_revert(lambda: harness.verify_leaf_update(nxt, overwritten, j, other,
                                                         tree.path(j, k)), "StateSlotNotEmpty")


# ------------------------------------------------------------------------------------------------
# Element descent (step 5)
# ------------------------------------------------------------------------------------------------


def padded_lie_levels(tree: TensorTree, fake_leaf_index: int) -> list[list[bytes]]:
    """The levels of `tree` with the padding leaf `fake_leaf_index` replaced by a non-ZERO hash:
    a provider hiding a value in the padding (consistent hashes, wrong padding)."""
    leaves = list(tree.levels[0])
    leaves[fake_leaf_index] = b"\x5a" * 32
    return ref.tree_levels(leaves)


@CHAIN_SETTINGS
@given(
    byte_length=st.integers(LEAF_BYTES + 1, 11 * LEAF_BYTES),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_verifyDescentStep_honestStepsAccepted_liesRejected(harness, byte_length, seed, data):
    array = random_tensor(seed, "int8", (byte_length,))
    tree = TensorTree(array)
    depth, dtype, shape = tree.depth, array.dtype, array.shape
    height = data.draw(st.integers(1, depth), label="height")
    fan_out_bits = data.draw(st.integers(1, height), label="m")
    index = data.draw(st.integers(0, 2 ** (depth - height) - 1), label="index")
    width = 2**fan_out_bits
    children = tree.levels[height - fan_out_bits][index * width:(index + 1) * width]
    node = tree.levels[height][index]
    ref.verify_descent_step(node, height, index, children, dtype, shape)
    harness.verify_descent_step(node, height, index, children, dtype, shape)

    def step(node=node, height=height, index=index, children=children):
        return lambda: harness.verify_descent_step(node, height, index, children, dtype, shape)

    lied = list(children)
    position = data.draw(st.integers(0, width - 1), label="lied child")
    lied[position] = flip(lied[position], 3)
    expect_revert(step(children=lied), "DescentChildrenMismatch")
    expect_revert(step(children=children[:-1]), "DescentFanOutInvalid")
    expect_revert(step(children=children[:1]), "DescentFanOutInvalid")
    expect_revert(step(height=depth + 1), "DescentNodeOutsideTree")
    expect_revert(step(height=0), "DescentNodeOutsideTree")
    expect_revert(step(index=2 ** (depth - height)), "DescentNodeOutsideTree")


def test_verifyDescentStep_lieInPadding_revertsAtTheRightChild(harness):
    # 5 chunks: depth 3, leaves 5..7 are padding. The liar's tree has leaf 6 = 0x5a..5a.
    array = random_tensor(11, "int32", (5 * LEAF_BYTES // 4 - 3,))
    tree = TensorTree(array)
    lie = padded_lie_levels(tree, 6)
    dtype, shape = array.dtype, array.shape
    # From the (lying) root, binary: the right half (leaves 4..7) holds real leaf 4, so it is
    # not padding and passes. Under it, (1, 3) covers leaves 6..7, all padding, and is not Z_1.
    harness.verify_descent_step(lie[3][0], 3, 0, lie[2][0:2], dtype, shape)
    err = expect_revert(
        lambda: harness.verify_descent_step(lie[2][1], 2, 1, lie[1][2:4], dtype, shape),
        "DescentPaddingNotZero",
    )
    assert err.args_decoded == (1,)
    # Fan-out 4 from the same node: leaf 5 is padding but honest (ZERO), leaf 6 is the lie.
    err = expect_revert(
        lambda: harness.verify_descent_step(lie[2][1], 2, 1, lie[0][4:8], dtype, shape),
        "DescentPaddingNotZero",
    )
    assert err.args_decoded == (2,)
    with pytest.raises(ref.ProofError, match="padding"):
        ref.verify_descent_step(lie[2][1], 2, 1, lie[0][4:8], dtype, shape)
    # The honest tree's padding children are Z_h and pass, at every fan-out.
    harness.verify_descent_step(tree.levels[3][0], 3, 0, tree.levels[0], dtype, shape)


# ------------------------------------------------------------------------------------------------
# Leaf chunk reveal and elements
# ------------------------------------------------------------------------------------------------


@CHAIN_SETTINGS
@given(dtype=st.sampled_from(DTYPES), count=st.integers(0, 1500), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_verifyLeafChunk_honestChunkAccepted_liesRejected(harness, dtype, count, seed, data):
    array = random_tensor(seed, dtype, (count,))
    tree = TensorTree(array)
    leaves = ref.leaf_count(array.nbytes)
    i = data.draw(st.integers(0, leaves - 1), label="leaf")
    chunk = bytes(tree.data[i * LEAF_BYTES:(i + 1) * LEAF_BYTES]).ljust(LEAF_BYTES, b"\0")
    leaf = tree.levels[0][i]
    shape = array.shape
    expected = ref.verify_leaf_chunk(leaf, i, chunk, dtype, shape)
    opened = harness.verify_leaf_chunk(leaf, i, chunk, dtype, shape)
    assert opened == expected

    # Elements decode on chain as numpy reads them.
    values = ref.decode_elements(dtype, expected)
    for e in sorted({0, len(values) // 2, len(values) - 1}) if len(values) else []:
        assert harness.decode_element(dtype, opened, e) == int(values[e])

    expect_revert(lambda: harness.verify_leaf_chunk(leaf, i, flip(chunk, 0), dtype, shape),
                  "LeafChunkHashMismatch")
    expect_revert(lambda: harness.verify_leaf_chunk(leaf, i, chunk[:-1], dtype, shape),
                  "LeafChunkLengthMismatch")
    expect_revert(lambda: harness.verify_leaf_chunk(leaf, leaves, chunk, dtype, shape),
                  "LeafChunkOutsideTensor")
    if len(expected) < LEAF_BYTES:
        # A liar's chunk with a value hidden in the padding, hashing to its own (lying) leaf.
        offset = data.draw(st.integers(len(expected), LEAF_BYTES - 1), label="padding byte")
        padded_lie = flip(chunk, offset)
        lie_leaf = ref._sha256(padded_lie)
        expect_revert(lambda: harness.verify_leaf_chunk(lie_leaf, i, padded_lie, dtype, shape),
                      "LeafChunkPaddingNotZero")


def test_decodeElement_extremesAndBoolBytes(harness):
    cases = {
        "int8": [-128, -1, 0, 127],
        "uint8": [0, 255],
        "int32": [-(2**31), -1, 2**31 - 1],
        "int64": [-(2**63), -1, 2**63 - 1],
        "bool": [False, True],
    }
    for dtype, values in cases.items():
        data = np.array(values, dtype=dtype).tobytes()
        assert [harness.decode_element(dtype, data, i) for i in range(len(values))] == [
            int(v) for v in values
        ]
    err = expect_revert(lambda: harness.decode_element("bool", b"\x01\x02", 1),
                        "InvalidBoolElement")
    assert err.args_decoded == (2,)
    expect_revert(lambda: harness.decode_element("int32", bytes(7), 1), "ElementOutsideData")


def test_decodeClaimedElement_readsABoolAsItsByte_point2(harness):
    """Issue 17, point 2: a claimed bool element is its byte, canonical or not, on chain as in
    `claimed_element`, so the one-step can judge 0x02 a wrong value instead of reverting; every
    other dtype decodes as `decodeElement` does."""
    for byte in (0, 1, 2, 0x80, 0xFF):
        assert harness.decode_claimed_element("bool", bytes([byte]), 0) == byte
        assert ref.claimed_element("bool", bytes([byte])) == byte
    for dtype, value in (("int8", -128), ("uint8", 255), ("int32", -5), ("int64", 2**63 - 1)):
        data = np.array([value], dtype=dtype).tobytes()
        assert harness.decode_claimed_element(dtype, data, 0) == value
        assert ref.claimed_element(dtype, data) == value
    assert harness.element_byte_range("int64", (3, 5), 14) == ref.element_byte_range(
        "int64", (3, 5), 14
    )
    expect_revert(lambda: harness.element_byte_range("int64", (3, 5), 15),
                  "ElementIndexOutsideTensor")


# ------------------------------------------------------------------------------------------------
# Gas (docs/performance.md)
# ------------------------------------------------------------------------------------------------


def test_gas_leafHashRangeProofLeafUpdate_withinBudget(harness):
    chunk = bytes(range(256)) * 4
    leaf_hash_gas = harness.gas_leaf_hash(chunk)

    # One int32 element of a (288, 8960) tensor: 10080 chunks, depth 14.
    array = random_tensor(3, "int32", (288, 8960))
    tree = TensorTree(array)
    start, end = ref.element_byte_range("int32", array.shape, 200 * 8960 + 4321)
    proof = tree.range_proof(start, end)
    assert len(proof.siblings) == tree.depth == 14
    range_gas = harness.gas_verify_tensor_range(tree.root, "int32", array.shape, start, end, proof)
    range_tx_gas = harness.estimate_gas(
        "verifyTensorRange", tree.root, 6, list(array.shape), start, end, proof
    )

    state = StateTree()
    state.extend([(i + 1).to_bytes(32, "big") for i in range(1000)])
    k = 777
    update_gas = harness.gas_verify_leaf_update(
        state.root(k - 1), state.root(k), k, state.leaf(k), state.path(k, k - 1)
    )
    print(f"\ngas: leaf hash {leaf_hash_gas}, range proof (1 int32 of 288x8960) {range_gas} "
          f"(tx {range_tx_gas}), state leaf update (depth 16) {update_gas}")
    # The precompile alone: 444 for the leaf, 15 x 84 + 444 for the range, 32 x 84 for the update.
    # Measured at 844 / 15839 / 11306 (anvil, cancun bytecode); the bounds leave some slack.
    assert 444 < leaf_hash_gas < 1_000
    assert 1704 < range_gas < 20_000
    assert 2688 < update_gas < 13_000
    # The Z_h table beats hashing upwards (~340 gas per level) beyond a few levels.
    assert harness.gas_zero_hash(14) < 14 * 340
