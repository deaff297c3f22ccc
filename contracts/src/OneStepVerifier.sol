// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {InvalidBoolElement, StatePathLengthMismatch} from "./Errors.sol";
import {IOneStepVerifier} from "./interfaces/IOneStepVerifier.sol";
import {Commitments} from "./lib/Commitments.sol";
import {NodeDescription} from "./lib/NodeDescription.sol";
import {
    ColumnSourceRankTooSmall,
    DescriptionNotInModel,
    DescriptionPathLengthMismatch,
    ExtraOpening,
    LeafNotBeforeNode,
    NodeIndexZero,
    OpenedTensorRefMismatch,
    OpenedTensorsMismatch,
    OpeningMismatch,
    OutputHeaderMismatch,
    TensorNotInAgreedState,
    TensorNotInConstants
} from "./lib/OneStepErrors.sol";
import {OneStepOps} from "./lib/OneStepOps.sol";
import {OneStepShapes} from "./lib/OneStepShapes.sol";
import {Sha256Merkle} from "./lib/Sha256Merkle.sol";

/// @title OneStepVerifier
/// @notice The one-step of a dispute (docs/protocol.md, "One step"): recomputes ONE element of
///         node k from openings against the roots in `Context` and says whether the provider's
///         committed element is wrong. It mirrors `optinfer.prover.one_step.check_witness`
///         check for check, in the same order:
///
///         1. node k's description against the nodes root; it parses;
///         2. the opened tensors are exactly the node's inputs (B as its column source), each
///            proven in S_{k-1} (state leaf j < k) or in the constants root;
///         3. the parameter openings (opened in full), with range proofs;
///         4. T_k's header against T_k; the dtype and shape node k must output against it;
///         5. the claimed element's range proof against T_k;
///         6. the data openings, exactly the reference's in its order, with range proofs;
///         7. the element recomputed with the op set's integer semantics against the claim.
///
///         A failure in 1, 2, 3, 5 or 6 reverts with the custom error of the broken rule (the
///         reference's ProofError). A difference in 4 or 7, or an op-set refusal on the agreed
///         inputs (index out of range, zero divisor, B outside [-64, 63], ...), returns true:
///         the provider loses (the reference's WrongClaim). Equal: false.
/// @dev    Stateless. Opened bytes are never copied: range proofs return calldata slices and
///         the element semantics (OneStepOps) read elements from them where they lie.
contract OneStepVerifier is IOneStepVerifier {
    using NodeDescription for NodeDescription.Node;

    /// @dev The verification's working state, in memory (one struct keeps the stack shallow).
    ///      Per input position p: `roots[p]` the opened tensor's root, `committed[p]` its
    ///      committed shape (for MatMulInteger's B: the column source's). `dataOffsets` and
    ///      `dataCounts` are the data openings of check 6, in order: the calldata offset of
    ///      each opened range's first element and its element count.
    struct Step {
        NodeDescription.Node node;
        uint256 k;
        uint256 outIndex;
        bytes32[] roots;
        uint64[][] committed;
        OneStepShapes.Signature sig;
        uint64[] outShape;
        uint256 nextRange;
        uint256[] dataOffsets;
        uint256[] dataCounts;
        uint256 dataCount;
    }

    ////////////////////////////////////////////////////////////////
    //                         External                           //
    ////////////////////////////////////////////////////////////////

    /// @inheritdoc IOneStepVerifier
    function providerWrong(Context calldata context, Witness calldata witness)
        external
        view
        returns (bool)
    {
        Step memory s = _describe(context, witness); // check 1
        _openTensors(s, context, witness); // check 2
        _openParameters(s, witness); // check 3

        // Check 4. Rule: the witness's header of T_k is the one T_k commits to.
        uint64[] memory outShape = witness.outputShape;
        uint8 outDtype = witness.outputDtype;
        if (Commitments.tensorRootFromDataRoot(outDtype, outShape, witness.outputDataRoot)
                != context.outputRoot) {
            revert OutputHeaderMismatch();
        }
        (bool ok, uint8 dtype, uint64[] memory shape) = OneStepShapes.expectedOutput(s.node, s.sig);
        if (!ok || dtype != outDtype || !_sameShape(shape, outShape)) return true;
        s.outShape = outShape;

        int256 claimed = _claimedElement(context, witness, outDtype, outShape); // check 5
        if (!_openData(s, witness)) return true; // check 6
        // Rule: the witness opens exactly what the element needs, nothing more.
        if (s.nextRange != witness.ranges.length) {
            revert ExtraOpening(witness.ranges.length, s.nextRange);
        }
        int256 value;
        (ok, value) = _recompute(s); // check 7
        return !ok || value != claimed;
    }

    ////////////////////////////////////////////////////////////////
    //                 Checks 1-3: what node k reads              //
    ////////////////////////////////////////////////////////////////

    /// @dev Check 1: the description is node k's in the model, and parses.
    function _describe(Context calldata c, Witness calldata w)
        private
        view
        returns (Step memory s)
    {
        // Rule: node indices start at 1 (leaf 0 is the graph input, not a node).
        if (c.k == 0) revert NodeIndexZero();
        // Rule: the nodes tree has the state tree's depth.
        if (w.descriptionPath.length != Commitments.STATE_DEPTH) {
            revert DescriptionPathLengthMismatch(w.descriptionPath.length);
        }
        // Rule: the description is leaf k of the registered model's nodes root.
        bytes32 leaf = sha256(w.description);
        if (Sha256Merkle.rootFromPath(leaf, c.k, w.descriptionPath) != c.nodesRoot) {
            revert DescriptionNotInModel(c.k);
        }
        s.node = NodeDescription.parse(w.description);
        s.k = c.k;
        s.outIndex = c.outIndex;
        uint256 inputs = s.node.kinds.length;
        s.roots = new bytes32[](inputs);
        s.committed = new uint64[][](inputs);
        s.sig.dtypes = new uint8[](inputs);
        s.sig.shapes = new uint64[][](inputs);
        s.sig.params = new int256[][](inputs);
        s.dataOffsets = new uint256[](w.ranges.length);
        s.dataCounts = new uint256[](w.ranges.length);
    }

    /// @dev Check 2: one opened tensor per present input, each proven where it must be.
    function _openTensors(Step memory s, Context calldata c, Witness calldata w) private view {
        uint256 inputs = s.node.kinds.length;
        bool[] memory filled = new bool[](inputs);
        uint256 expected = 0;
        for (uint256 p = 0; p < inputs; ++p) {
            if (s.node.present(p)) ++expected;
        }
        for (uint256 i = 0; i < w.tensors.length; ++i) {
            uint256 p = w.tensors[i].position;
            bool columns = s.node.op == NodeDescription.MATMUL_INTEGER && p == 1;
            // Rule: each opened tensor fills one input slot of the node, in its layout.
            if (p >= inputs || !s.node.present(p) || w.tensors[i].columns != columns || filled[p]) {
                revert OpenedTensorsMismatch(p);
            }
            filled[p] = true;
        }
        // Rule: every present input is opened.
        if (w.tensors.length != expected) revert OpenedTensorsMismatch(w.tensors.length);
        for (uint256 i = 0; i < w.tensors.length; ++i) {
            _checkTensor(s, c, w.tensors[i]);
        }
        for (uint256 p = 0; p < inputs; ++p) {
            s.sig.shapes[p] = s.committed[p];
        }
        if (s.node.op == NodeDescription.MATMUL_INTEGER) {
            // B's ONNX shape is its column source's with the last two axes swapped back.
            uint64[] memory source = s.committed[1];
            uint256 rank = source.length;
            if (rank < 2) revert ColumnSourceRankTooSmall(rank);
            uint64[] memory b = new uint64[](rank);
            for (uint256 a = 0; a < rank - 2; ++a) b[a] = source[a];
            (b[rank - 2], b[rank - 1]) = (source[rank - 1], source[rank - 2]);
            s.sig.shapes[1] = b;
        }
    }

    /// @dev One opened tensor: it is the one the node names, its header and data root give its
    ///      root, and the root is in S_{k-1} (state leaf j < k) or in the constants root.
    function _checkTensor(Step memory s, Context calldata c, OpenedTensor calldata t) private view {
        uint256 p = t.position;
        (uint8 kind, uint32 index) = t.columns
            ? (s.node.columnKind, s.node.columnIndex)
            : (s.node.kinds[p], s.node.indices[p]);
        // Rule: the opened tensor is the one the description names at this input.
        if (t.kind != kind || t.index != index) revert OpenedTensorRefMismatch(p);
        uint64[] memory shape = t.shape;
        bytes32 root = Commitments.tensorRootFromDataRoot(t.dtype, shape, t.dataRoot);
        if (kind == NodeDescription.KIND_LEAF) {
            // Rule: node k reads only tensors computed before it.
            if (index >= c.k) revert LeafNotBeforeNode(index, c.k);
            if (t.path.length != Commitments.STATE_DEPTH) revert StatePathLengthMismatch(t.path.length);
            // Rule: the leaf's root is in the agreed state S_{k-1}.
            if (root == bytes32(0) || Sha256Merkle.rootFromPath(root, index, t.path) != c.agreedState) {
                revert TensorNotInAgreedState(p);
            }
        } else if (Sha256Merkle.rootFromPath(root, index, t.path) != c.constantsRoot) {
            // Rule: a constant's root is in the model's constants root. (Its path length is not
            // fixed, but a tensor root's preimage is never the 64 bytes of an internal node.)
            revert TensorNotInConstants(p);
        }
        s.roots[p] = root;
        s.committed[p] = shape;
        s.sig.dtypes[p] = t.dtype;
    }

    /// @dev Check 3: every present, non-empty parameter opened in full, in input order.
    function _openParameters(Step memory s, Witness calldata w) private view {
        uint256 mask = OneStepShapes.parameterMask(s.node.op);
        for (uint256 p = 0; p < s.node.kinds.length; ++p) {
            if (mask & (uint256(1) << p) == 0 || !s.node.present(p)) continue;
            uint256 count = Commitments.elementCount(s.sig.shapes[p]);
            if (count == 0) continue; // its header already says it is empty
            uint256 offset = _open(s, w, p, false, 0, count);
            uint8 dtype = s.sig.dtypes[p];
            uint256 size = Commitments.itemSize(dtype);
            int256[] memory values = new int256[](count);
            for (uint256 i = 0; i < count; ++i) values[i] = OneStepOps.load(dtype, offset + i * size);
            s.sig.params[p] = values;
        }
    }

    ////////////////////////////////////////////////////////////////
    //                 Check 5: the claimed element               //
    ////////////////////////////////////////////////////////////////

    function _claimedElement(
        Context calldata c,
        Witness calldata w,
        uint8 dtype,
        uint64[] memory shape
    ) private view returns (int256) {
        // Reverts ElementIndexOutsideTensor unless outIndex < the element count.
        (uint256 start, uint256 end) = Commitments.elementByteRange(dtype, shape, c.outIndex);
        bytes calldata element =
            Commitments.verifyTensorRange(c.outputRoot, dtype, shape, start, end, w.outputProof);
        return Commitments.decodeClaimedElement(dtype, element, 0);
    }

    ////////////////////////////////////////////////////////////////
    //                  Check 6: the data openings                //
    ////////////////////////////////////////////////////////////////

    /// @dev Open, in the reference's order (`element_dependencies`), every input element the
    ///      output element needs. False on an op-set refusal found on the way (a Gather index
    ///      outside [-dim, dim)).
    function _openData(Step memory s, Witness calldata w) private view returns (bool) {
        uint8 op = s.node.op;
        uint256[] memory o = OneStepShapes.unravel(s.outIndex, s.outShape);
        if (op >= NodeDescription.ADD && op <= NodeDescription.GREATER) {
            uint256 rank = s.outShape.length;
            _openData(s, w, 0, false, OneStepShapes.broadcastFlat(o, rank, s.sig.shapes[0]), 1);
            _openData(s, w, 1, false, OneStepShapes.broadcastFlat(o, rank, s.sig.shapes[1]), 1);
        } else if (op == NodeDescription.CLIP || op == NodeDescription.CAST
                || op == NodeDescription.RESHAPE) {
            // Same shape, or (Reshape) the same row-major order: the same flat index.
            _openData(s, w, 0, false, s.outIndex, 1);
        } else if (op == NodeDescription.TRANSPOSE) {
            (, int256[] memory perm) = OneStepShapes.permutation(s.node, o.length);
            uint256[] memory source = new uint256[](o.length);
            for (uint256 t = 0; t < o.length; ++t) source[uint256(perm[t])] = o[t];
            _openData(s, w, 0, false, OneStepShapes.ravel(source, s.sig.shapes[0]), 1);
        } else if (op == NodeDescription.SLICE) {
            (, OneStepShapes.Window[] memory windows) = OneStepShapes.sliceWindows(s.node, s.sig);
            uint256[] memory source = new uint256[](o.length);
            for (uint256 a = 0; a < o.length; ++a) {
                source[a] = uint256(windows[a].start + int256(o[a]) * windows[a].step);
            }
            _openData(s, w, 0, false, OneStepShapes.ravel(source, s.sig.shapes[0]), 1);
        } else if (op == NodeDescription.CONCAT) {
            _openConcat(s, w, o);
        } else if (op == NodeDescription.REDUCE_SUM || op == NodeDescription.REDUCE_MAX
                || op == NodeDescription.ARG_MAX) {
            _openGroup(s, w, o);
        } else if (op == NodeDescription.GATHER || op == NodeDescription.GATHER_ELEMENTS) {
            return _openGathered(s, w, o);
        } else if (op == NodeDescription.MATMUL_INTEGER) {
            _openRows(s, w, o);
        }
        // Shape reads only its input's header, Range only its parameters.
        return true;
    }

    /// @dev Concat: the one element of the input that holds o[axis].
    function _openConcat(Step memory s, Witness calldata w, uint256[] memory o) private view {
        (, uint256 axis) = OneStepShapes.normalizeAxis(s.node.axis, o.length);
        uint256 offset = o[axis];
        for (uint256 p = 0; p < s.sig.shapes.length; ++p) {
            uint64[] memory shape = s.sig.shapes[p];
            if (offset < shape[axis]) {
                o[axis] = offset;
                _openData(s, w, p, false, OneStepShapes.ravel(o, shape), 1);
                return;
            }
            offset -= shape[axis];
        }
    }

    /// @dev Reductions and ArgMax: the group of the output element (its index on the kept
    ///      axes, every index on the reduced ones), as maximal contiguous runs in increasing
    ///      order. The trailing reduced axes form one contiguous block per combination of the
    ///      other reduced axes, so a last-axis group is a single run.
    function _openGroup(Step memory s, Witness calldata w, uint256[] memory o) private view {
        (, bool[] memory reduced) = OneStepShapes.reducedAxes(s.node, s.sig);
        bool keep = OneStepShapes.keepdims(s.node);
        uint64[] memory shape = s.sig.shapes[0];
        uint256 rank = shape.length;
        uint256[] memory multi = new uint256[](rank);
        uint256 kept = 0;
        for (uint256 a = 0; a < rank; ++a) {
            if (reduced[a]) {
                if (shape[a] == 0) return; // an empty group opens nothing
                if (keep) ++kept;
            } else {
                multi[a] = o[kept++];
            }
        }
        uint256 inner = rank; // the trailing reduced axes start here
        uint256 block = 1;
        while (inner > 0 && reduced[inner - 1]) block *= shape[--inner];
        uint256 runStart = 0;
        uint256 runCount = 0;
        while (true) {
            uint256 flat = OneStepShapes.ravel(multi, shape);
            if (runCount != 0 && runStart + runCount == flat) {
                runCount += block;
            } else {
                if (runCount != 0) _openData(s, w, 0, false, runStart, runCount);
                (runStart, runCount) = (flat, block);
            }
            if (!_advance(multi, reduced, shape, inner)) break;
        }
        _openData(s, w, 0, false, runStart, runCount);
    }

    /// @dev Odometer over the reduced axes below `inner`, last fastest; false when done.
    function _advance(uint256[] memory multi, bool[] memory reduced, uint64[] memory shape, uint256 inner)
        private
        pure
        returns (bool)
    {
        for (uint256 a = inner; a > 0; --a) {
            if (!reduced[a - 1]) continue;
            if (++multi[a - 1] < shape[a - 1]) return true;
            multi[a - 1] = 0;
        }
        return false;
    }

    /// @dev Gather / GatherElements: the index element first, then the data element it selects.
    ///      False when the index is outside [-dim, dim) (an op-set refusal).
    function _openGathered(Step memory s, Witness calldata w, uint256[] memory o)
        private
        view
        returns (bool)
    {
        uint64[] memory data = s.sig.shapes[0];
        (, uint256 axis) = OneStepShapes.gatherAxis(s.node, data.length);
        uint256 indexRank = s.sig.shapes[1].length;
        uint256 indexFlat = s.outIndex; // GatherElements: the output has the indices' shape
        if (s.node.op == NodeDescription.GATHER) {
            uint256[] memory at = new uint256[](indexRank);
            for (uint256 i = 0; i < indexRank; ++i) at[i] = o[axis + i];
            indexFlat = OneStepShapes.ravel(at, s.sig.shapes[1]);
        } else {
            indexRank = 1; // GatherElements replaces o[axis] itself
        }
        uint256 offset = _openData(s, w, 1, false, indexFlat, 1);
        int256 index = OneStepOps.load(s.sig.dtypes[1], offset); // int32 or int64
        int256 dim = int256(uint256(data[axis]));
        // Op-set precondition: every index lies in [-dim, dim).
        if (index < -dim || index >= dim) return false;
        uint256[] memory source = new uint256[](data.length);
        for (uint256 a = 0; a < axis; ++a) source[a] = o[a];
        source[axis] = uint256(index < 0 ? index + dim : index);
        for (uint256 a = axis + 1; a < data.length; ++a) source[a] = o[a - 1 + indexRank];
        _openData(s, w, 0, false, OneStepShapes.ravel(source, data), 1);
        return true;
    }

    /// @dev MatMulInteger: row i of A, then row j of the column source (= column j of B), with
    ///      batch broadcasting (a size-1 batch axis reads batch 0).
    function _openRows(Step memory s, Witness calldata w, uint256[] memory o) private view {
        uint64[] memory a = s.sig.shapes[0];
        uint64[] memory b = s.sig.shapes[1];
        uint256 k = a[a.length - 1];
        (uint64[] memory batch, uint64[] memory aBatch, uint64[] memory bBatch) =
            OneStepShapes.matmulBatches(a, b);
        uint256 aStart = 0;
        if (a.length > 1) {
            uint256 aRow = OneStepShapes.broadcastFlat(o, batch.length, aBatch) * a[a.length - 2]
                + o[o.length - 2];
            aStart = aRow * k;
        }
        uint256 bRow = OneStepShapes.broadcastFlat(o, batch.length, bBatch) * b[b.length - 1]
            + o[o.length - 1];
        _openData(s, w, 0, false, aStart, k);
        _openData(s, w, 1, true, bRow * k, k);
    }

    /// @dev A data opening (check 6): verified like any opening and recorded for check 7.
    function _openData(
        Step memory s,
        Witness calldata w,
        uint256 position,
        bool columns,
        uint256 start,
        uint256 count
    ) private view returns (uint256 offset) {
        offset = _open(s, w, position, columns, start, count);
        s.dataOffsets[s.dataCount] = offset;
        s.dataCounts[s.dataCount] = count;
        ++s.dataCount;
    }

    /// @dev The witness's next range must be exactly this opening; verify its range proof
    ///      against the input's root and return the calldata offset of its first element.
    function _open(
        Step memory s,
        Witness calldata w,
        uint256 position,
        bool columns,
        uint256 start,
        uint256 count
    ) private view returns (uint256 offset) {
        uint256 i = s.nextRange++;
        // Rule: the witness's ranges are the reference's openings, in its order.
        if (i >= w.ranges.length) revert OpeningMismatch(i);
        OpenedRange calldata r = w.ranges[i];
        if (r.position != position || r.columns != columns || r.startElement != start
                || r.count != count) {
            revert OpeningMismatch(i);
        }
        uint8 dtype = s.sig.dtypes[position];
        uint256 size = Commitments.itemSize(dtype);
        bytes calldata opened = Commitments.verifyTensorRange(
            s.roots[position], dtype, s.committed[position], start * size, (start + count) * size,
            r.proof
        );
        if (dtype == Commitments.DTYPE_BOOL) _requireBools(opened);
        assembly {
            offset := opened.offset
        }
    }

    /// @dev Rule: a bool element is the byte 0x00 or 0x01.
    function _requireBools(bytes calldata data) private pure {
        for (uint256 i = 0; i < data.length; ++i) {
            if (uint8(data[i]) > 1) revert InvalidBoolElement(uint8(data[i]));
        }
    }

    ////////////////////////////////////////////////////////////////
    //                 Check 7: the element's value               //
    ////////////////////////////////////////////////////////////////

    /// @dev The element from the opened values alone; `ok` false on an op-set refusal.
    function _recompute(Step memory s) private pure returns (bool ok, int256 value) {
        uint8 op = s.node.op;
        uint8[] memory dtypes = s.sig.dtypes;
        uint256[] memory at = s.dataOffsets;
        if (op >= NodeDescription.ADD && op <= NodeDescription.GREATER) {
            return OneStepOps.elementwise(
                op, dtypes[0], dtypes[1], OneStepOps.load(dtypes[0], at[0]),
                OneStepOps.load(dtypes[1], at[1])
            );
        }
        if (op == NodeDescription.CLIP) return _clip(s);
        if (op == NodeDescription.CAST) {
            return (true, OneStepOps.wrap(OneStepOps.load(dtypes[0], at[0]), uint8(uint64(s.node.to))));
        }
        if (op == NodeDescription.RESHAPE || op == NodeDescription.TRANSPOSE
                || op == NodeDescription.SLICE) {
            return (true, OneStepOps.load(dtypes[0], at[0]));
        }
        if (op == NodeDescription.CONCAT) return (true, OneStepOps.load(dtypes[0], at[0]));
        if (op == NodeDescription.GATHER || op == NodeDescription.GATHER_ELEMENTS) {
            return (true, OneStepOps.load(dtypes[0], at[1]));
        }
        if (op == NodeDescription.SHAPE) return (true, int256(uint256(s.sig.shapes[0][s.outIndex])));
        if (op == NodeDescription.RANGE) {
            return (true, s.sig.params[0][0] + int256(s.outIndex) * s.sig.params[2][0]);
        }
        // The runs of a group, for the reductions.
        uint256[] memory counts = s.dataCounts;
        uint256 n = s.dataCount;
        assembly {
            mstore(at, n)
            mstore(counts, n)
        }
        if (op == NodeDescription.REDUCE_SUM) return OneStepOps.reduceSum(dtypes[0], at, counts);
        if (op == NodeDescription.REDUCE_MAX) return OneStepOps.reduceMax(dtypes[0], at, counts, false);
        if (op == NodeDescription.ARG_MAX) return OneStepOps.reduceMax(dtypes[0], at, counts, true);
        return _matmul(s);
    }

    function _clip(Step memory s) private pure returns (bool, int256) {
        bool hasLow = s.node.present(1);
        bool hasHigh = s.node.present(2);
        uint8[] memory dtypes = s.sig.dtypes;
        return OneStepOps.clip(
            dtypes[0],
            OneStepOps.load(dtypes[0], s.dataOffsets[0]),
            hasLow,
            dtypes.length > 1 ? dtypes[1] : 0,
            hasLow ? s.sig.params[1][0] : int256(0),
            hasHigh,
            dtypes.length > 2 ? dtypes[2] : 0,
            hasHigh ? s.sig.params[2][0] : int256(0)
        );
    }

    /// @dev MatMulInteger's element; refused unless A is uint8, B int8, the zero point uint8.
    function _matmul(Step memory s) private pure returns (bool, int256) {
        uint8[] memory dtypes = s.sig.dtypes;
        if (dtypes[0] != Commitments.DTYPE_UINT8 || dtypes[1] != Commitments.DTYPE_INT8) {
            return (false, 0);
        }
        int256 zeroPoint = 0;
        if (s.node.present(2)) {
            if (dtypes[2] != Commitments.DTYPE_UINT8) return (false, 0);
            zeroPoint = s.sig.params[2][0];
        }
        return OneStepOps.dot(s.dataOffsets[0], s.dataOffsets[1], s.dataCounts[0], zeroPoint);
    }

    ////////////////////////////////////////////////////////////////
    //                          Helpers                           //
    ////////////////////////////////////////////////////////////////

    function _sameShape(uint64[] memory a, uint64[] memory b) private pure returns (bool) {
        if (a.length != b.length) return false;
        for (uint256 i = 0; i < a.length; ++i) {
            if (a[i] != b[i]) return false;
        }
        return true;
    }
}
