// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {Commitments} from "./Commitments.sol";
import {NodeDescription} from "./NodeDescription.sol";

/// @title OneStepShapes
/// @notice Index arithmetic of the one-step: the dtype and shape a node must output
///         (`expected_output` in optinfer.prover.one_step_element), Slice's clamped windows,
///         reduced axes, C-order ravel/unravel and numpy broadcasting.
/// @dev    Where the op set refuses the inputs (an OpSemanticsError in the reference, which also
///         turns an out-of-range axis into one) the functions return `ok = false` instead of
///         reverting: a refusal on the agreed inputs makes the provider lose, it is not a
///         malformed witness.
library OneStepShapes {
    using NodeDescription for NodeDescription.Node;

    /// @notice What the one-step knows of node k's inputs, per input position: dtype (0 when
    ///         absent), shape in ONNX layout (MatMulInteger's B swapped back from its column
    ///         source) and, for a parameter input, its values (empty when it has none).
    struct Signature {
        uint8[] dtypes;
        uint64[][] shapes;
        int256[][] params;
    }

    /// @notice One data axis of a Slice after ONNX's clamping: the first kept index, the step
    ///         and how many indices are kept.
    struct Window {
        int256 start;
        int256 step;
        uint256 count;
    }

    int256 private constant INT32_MAX = type(int32).max;
    int256 private constant INT64_MAX = type(int64).max;
    /// @dev Saturation cap for products of int64 dimensions: above any real element count.
    uint256 private constant PRODUCT_CAP = 1 << 128;

    ////////////////////////////////////////////////////////////////
    //                 Parameter and index inputs                 //
    ////////////////////////////////////////////////////////////////

    /// @notice Input positions (bit p) of the parameters the one-step opens in full, per op:
    ///         Clip's bounds, the reduction axes, Reshape's shape, Slice's starts/ends/axes/steps,
    ///         Range's three scalars, MatMulInteger's zero point.
    function parameterMask(uint8 op) internal pure returns (uint256) {
        if (op == NodeDescription.CLIP) return 0x6;
        if (op == NodeDescription.REDUCE_SUM || op == NodeDescription.REDUCE_MAX) return 0x2;
        if (op == NodeDescription.RESHAPE) return 0x2;
        if (op == NodeDescription.SLICE) return 0x1e;
        if (op == NodeDescription.RANGE) return 0x7;
        if (op == NodeDescription.MATMUL_INTEGER) return 0x4;
        return 0;
    }

    /// @dev Positions that must be int64, int32 or int64 (Gather's indices), single elements,
    ///      and 1-D, per op.
    function _inputRules(uint8 op)
        private
        pure
        returns (uint256 int64Mask, uint256 indexMask, uint256 scalarMask, uint256 vectorMask)
    {
        if (op == NodeDescription.REDUCE_SUM || op == NodeDescription.REDUCE_MAX) {
            return (0x2, 0, 0, 0x2);
        }
        if (op == NodeDescription.GATHER || op == NodeDescription.GATHER_ELEMENTS) {
            return (0, 0x2, 0, 0);
        }
        if (op == NodeDescription.RESHAPE) return (0x2, 0, 0, 0x2);
        if (op == NodeDescription.SLICE) return (0x1e, 0, 0, 0x1e);
        if (op == NodeDescription.RANGE) return (0x7, 0, 0x7, 0);
        if (op == NodeDescription.CLIP) return (0, 0, 0x6, 0);
        if (op == NodeDescription.MATMUL_INTEGER) return (0, 0, 0x4, 0);
        return (0, 0, 0, 0);
    }

    ////////////////////////////////////////////////////////////////
    //                     The output signature                   //
    ////////////////////////////////////////////////////////////////

    /// @notice The dtype code and shape node k must output, from its inputs' signature and
    ///         parameters; `ok` false where the op set refuses them (the provider loses).
    function expectedOutput(NodeDescription.Node memory node, Signature memory sig)
        public
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        if (!_inputsFollowRules(node, sig)) return (false, 0, shape);
        uint8 op = node.op;
        if (op >= NodeDescription.ADD && op <= NodeDescription.GREATER) {
            (ok, shape) = broadcastShapes(sig.shapes[0], sig.shapes[1]);
            dtype = op == NodeDescription.GREATER ? Commitments.DTYPE_BOOL : sig.dtypes[0];
            return (ok, dtype, shape);
        }
        if (op == NodeDescription.CLIP) return (true, sig.dtypes[0], sig.shapes[0]);
        if (op == NodeDescription.CAST) {
            if (!node.has(NodeDescription.ATTR_TO) || !isDtype(node.to)) return (false, 0, shape);
            return (true, uint8(uint64(node.to)), sig.shapes[0]);
        }
        if (op == NodeDescription.REDUCE_SUM || op == NodeDescription.REDUCE_MAX
                || op == NodeDescription.ARG_MAX) {
            return _reducedOutput(node, sig);
        }
        if (op == NodeDescription.GATHER) return _gatherOutput(node, sig);
        if (op == NodeDescription.GATHER_ELEMENTS) return _gatherElementsOutput(node, sig);
        if (op == NodeDescription.RESHAPE) {
            (ok, shape) = reshapeTarget(sig.shapes[0], sig.params[1]);
            return (ok, sig.dtypes[0], shape);
        }
        if (op == NodeDescription.TRANSPOSE) {
            int256[] memory perm;
            (ok, perm) = permutation(node, sig.shapes[0].length);
            if (!ok) return (false, 0, shape);
            shape = new uint64[](perm.length);
            for (uint256 t = 0; t < perm.length; ++t) shape[t] = sig.shapes[0][uint256(perm[t])];
            return (true, sig.dtypes[0], shape);
        }
        if (op == NodeDescription.CONCAT) return _concatOutput(node, sig);
        if (op == NodeDescription.SLICE) {
            Window[] memory windows;
            (ok, windows) = sliceWindows(node, sig);
            if (!ok) return (false, 0, shape);
            shape = new uint64[](windows.length);
            for (uint256 a = 0; a < windows.length; ++a) shape[a] = uint64(windows[a].count);
            return (true, sig.dtypes[0], shape);
        }
        if (op == NodeDescription.SHAPE) {
            shape = new uint64[](1);
            shape[0] = uint64(sig.shapes[0].length);
            return (true, Commitments.DTYPE_INT64, shape);
        }
        if (op == NodeDescription.RANGE) return _rangeOutput(sig);
        return _matmulOutput(sig);
    }

    /// @dev Parameter inputs are int64, indices int32 or int64, scalars single elements,
    ///      vectors 1-D.
    function _inputsFollowRules(NodeDescription.Node memory node, Signature memory sig)
        private
        pure
        returns (bool)
    {
        (uint256 int64Mask, uint256 indexMask, uint256 scalarMask, uint256 vectorMask) =
            _inputRules(node.op);
        for (uint256 p = 0; p < 5; ++p) {
            if (!node.present(p)) continue;
            uint256 bit = uint256(1) << p;
            uint8 dtype = sig.dtypes[p];
            if (int64Mask & bit != 0 && dtype != Commitments.DTYPE_INT64) return false;
            if (indexMask & bit != 0 && dtype != Commitments.DTYPE_INT64
                    && dtype != Commitments.DTYPE_INT32) {
                return false;
            }
            if (scalarMask & bit != 0
                    && (sig.shapes[p].length > 1 || Commitments.elementCount(sig.shapes[p]) != 1)) {
                return false;
            }
            if (vectorMask & bit != 0 && sig.shapes[p].length != 1) return false;
        }
        return true;
    }

    /// @notice Whether `code` is one of the five committable dtypes.
    function isDtype(int256 code) internal pure returns (bool) {
        return code == int256(uint256(Commitments.DTYPE_UINT8))
            || code == int256(uint256(Commitments.DTYPE_INT8))
            || code == int256(uint256(Commitments.DTYPE_INT32))
            || code == int256(uint256(Commitments.DTYPE_INT64))
            || code == int256(uint256(Commitments.DTYPE_BOOL));
    }

    function _reducedOutput(NodeDescription.Node memory node, Signature memory sig)
        private
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        bool[] memory reduced;
        (ok, reduced) = reducedAxes(node, sig);
        if (!ok) return (false, 0, shape);
        bool keep = keepdims(node);
        uint64[] memory input = sig.shapes[0];
        uint256 rank = 0;
        for (uint256 a = 0; a < input.length; ++a) {
            if (keep || !reduced[a]) ++rank;
        }
        shape = new uint64[](rank);
        uint256 t = 0;
        for (uint256 a = 0; a < input.length; ++a) {
            if (!reduced[a]) shape[t++] = input[a];
            else if (keep) shape[t++] = 1;
        }
        dtype = node.op == NodeDescription.ARG_MAX ? Commitments.DTYPE_INT64 : sig.dtypes[0];
        return (true, dtype, shape);
    }

    /// @notice The reduced axes of ReduceSum/ReduceMax (their axes parameter; none or empty
    ///         reduces every axis) or ArgMax (its axis attribute, default 0, and
    ///         select_last_index must be 0), as a flag per data axis; `ok` false on a refusal
    ///         (axis out of range, duplicate axes).
    function reducedAxes(NodeDescription.Node memory node, Signature memory sig)
        internal
        pure
        returns (bool ok, bool[] memory reduced)
    {
        uint256 rank = sig.shapes[0].length;
        reduced = new bool[](rank);
        if (node.op == NodeDescription.ARG_MAX) {
            if (node.selectLastIndex != 0) return (false, reduced);
            uint256 axis;
            (ok, axis) = normalizeAxis(_axisAttribute(node), rank);
            if (ok) reduced[axis] = true;
            return (ok, reduced);
        }
        int256[] memory axes = node.present(1) ? sig.params[1] : new int256[](0);
        if (axes.length == 0) {
            for (uint256 a = 0; a < rank; ++a) reduced[a] = true;
            return (true, reduced);
        }
        for (uint256 i = 0; i < axes.length; ++i) {
            uint256 axis;
            (ok, axis) = normalizeAxis(axes[i], rank);
            if (!ok || reduced[axis]) return (false, reduced);
            reduced[axis] = true;
        }
        return (true, reduced);
    }

    /// @notice keepdims as the reference reads it: default 1, any nonzero value keeps.
    function keepdims(NodeDescription.Node memory node) internal pure returns (bool) {
        return !node.has(NodeDescription.ATTR_KEEPDIMS) || node.keepdims != 0;
    }

    /// @dev The axis attribute, default 0.
    function _axisAttribute(NodeDescription.Node memory node) private pure returns (int256) {
        return node.has(NodeDescription.ATTR_AXIS) ? int256(node.axis) : int256(0);
    }

    /// @notice Gather's/GatherElements' axis (attribute, default 0) normalized for `rank`.
    function gatherAxis(NodeDescription.Node memory node, uint256 rank)
        internal
        pure
        returns (bool, uint256)
    {
        return normalizeAxis(_axisAttribute(node), rank);
    }

    function _gatherOutput(NodeDescription.Node memory node, Signature memory sig)
        private
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        uint64[] memory data = sig.shapes[0];
        uint64[] memory indices = sig.shapes[1];
        uint256 axis;
        (ok, axis) = gatherAxis(node, data.length);
        if (!ok) return (false, 0, shape);
        shape = new uint64[](data.length - 1 + indices.length);
        uint256 t = 0;
        for (uint256 a = 0; a < axis; ++a) shape[t++] = data[a];
        for (uint256 a = 0; a < indices.length; ++a) shape[t++] = indices[a];
        for (uint256 a = axis + 1; a < data.length; ++a) shape[t++] = data[a];
        return (true, sig.dtypes[0], shape);
    }

    function _gatherElementsOutput(NodeDescription.Node memory node, Signature memory sig)
        private
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        uint64[] memory data = sig.shapes[0];
        uint64[] memory indices = sig.shapes[1];
        uint256 axis;
        (ok, axis) = gatherAxis(node, data.length);
        if (!ok || indices.length != data.length) return (false, 0, shape);
        for (uint256 a = 0; a < data.length; ++a) {
            if (a != axis && indices[a] > data[a]) return (false, 0, shape);
        }
        return (true, sig.dtypes[0], indices);
    }

    function _concatOutput(NodeDescription.Node memory node, Signature memory sig)
        private
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        uint64[] memory first = sig.shapes[0];
        uint256 axis;
        if (!node.has(NodeDescription.ATTR_AXIS)) return (false, 0, shape);
        (ok, axis) = normalizeAxis(node.axis, first.length);
        if (!ok) return (false, 0, shape);
        uint256 total = 0;
        for (uint256 p = 0; p < sig.shapes.length; ++p) {
            uint64[] memory s = sig.shapes[p];
            if (s.length != first.length || sig.dtypes[p] != sig.dtypes[0]) return (false, 0, shape);
            for (uint256 a = 0; a < first.length; ++a) {
                if (a != axis && s[a] != first[a]) return (false, 0, shape);
            }
            total += s[axis];
        }
        shape = new uint64[](first.length);
        for (uint256 a = 0; a < first.length; ++a) shape[a] = first[a];
        if (total >> 64 != 0) return (false, 0, shape);
        shape[axis] = uint64(total);
        return (true, sig.dtypes[0], shape);
    }

    function _rangeOutput(Signature memory sig)
        private
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        int256 start = sig.params[0][0];
        int256 limit = sig.params[1][0];
        int256 delta = sig.params[2][0];
        if (delta == 0) return (false, 0, shape);
        // n = max(ceil((limit - start) / delta), 0) = max(-floor((start - limit) / delta), 0),
        // exact in 256 bits for int64 operands.
        int256 count = -floorDiv(start - limit, delta);
        shape = new uint64[](1);
        shape[0] = count > 0 ? uint64(uint256(count)) : 0;
        return (true, Commitments.DTYPE_INT64, shape);
    }

    function _matmulOutput(Signature memory sig)
        private
        pure
        returns (bool ok, uint8 dtype, uint64[] memory shape)
    {
        uint64[] memory a = sig.shapes[0];
        uint64[] memory b = sig.shapes[1];
        if (a.length == 0 || a[a.length - 1] != b[b.length - 2]) return (false, 0, shape);
        uint64[] memory batch;
        (ok, batch) = broadcastShapes(_batch(a), _batch(b));
        if (!ok) return (false, 0, shape);
        uint256 rows = a.length > 1 ? 1 : 0;
        shape = new uint64[](batch.length + rows + 1);
        for (uint256 i = 0; i < batch.length; ++i) shape[i] = batch[i];
        if (rows == 1) shape[batch.length] = a[a.length - 2];
        shape[shape.length - 1] = b[b.length - 1];
        return (true, Commitments.DTYPE_INT32, shape);
    }

    /// @notice The batch axes of a MatMulInteger operand: all but its last two.
    function _batch(uint64[] memory s) private pure returns (uint64[] memory batch) {
        uint256 length = s.length > 2 ? s.length - 2 : 0;
        batch = new uint64[](length);
        for (uint256 i = 0; i < length; ++i) batch[i] = s[i];
    }

    /// @notice MatMulInteger's batch shape of the output, and the batch axes of A and B.
    function matmulBatches(uint64[] memory a, uint64[] memory b)
        internal
        pure
        returns (uint64[] memory out, uint64[] memory aBatch, uint64[] memory bBatch)
    {
        aBatch = _batch(a);
        bBatch = _batch(b);
        (, out) = broadcastShapes(aBatch, bBatch);
    }

    ////////////////////////////////////////////////////////////////
    //                    Reshape and Transpose                   //
    ////////////////////////////////////////////////////////////////

    /// @notice Reshape's target: 0 copies the input dim at that position, one -1 is inferred,
    ///         the element count is kept (`_reshape_target` in the reference).
    function reshapeTarget(uint64[] memory input, int256[] memory target)
        internal
        pure
        returns (bool ok, uint64[] memory shape)
    {
        uint256 count = Commitments.elementCount(input);
        uint256[] memory dims = new uint256[](target.length);
        uint256 inferred = type(uint256).max; // position of the -1, if any
        uint256 known = 1;
        for (uint256 i = 0; i < target.length; ++i) {
            int256 d = target[i];
            if (d == 0) {
                if (i >= input.length) return (false, shape);
                dims[i] = input[i];
            } else if (d == -1) {
                if (inferred != type(uint256).max) return (false, shape);
                inferred = i;
                continue;
            } else if (d < -1) {
                return (false, shape);
            } else {
                dims[i] = uint256(d);
            }
            known = _saturatingMul(known, dims[i]);
        }
        if (inferred != type(uint256).max) {
            if (known == 0 || count % known != 0) return (false, shape);
            dims[inferred] = count / known;
            known = _saturatingMul(known, dims[inferred]);
        }
        if (known != count) return (false, shape);
        shape = new uint64[](dims.length);
        for (uint256 i = 0; i < dims.length; ++i) shape[i] = uint64(dims[i]);
        return (true, shape);
    }

    /// @notice Transpose's perm (attribute, default reversed axes), checked to be a permutation
    ///         of 0..rank-1.
    function permutation(NodeDescription.Node memory node, uint256 rank)
        internal
        pure
        returns (bool ok, int256[] memory perm)
    {
        perm = new int256[](rank);
        if (!node.has(NodeDescription.ATTR_PERM)) {
            for (uint256 t = 0; t < rank; ++t) perm[t] = int256(rank - 1 - t);
            return (true, perm);
        }
        if (node.perm.length != rank) return (false, perm);
        bool[] memory seen = new bool[](rank);
        for (uint256 t = 0; t < rank; ++t) {
            int256 axis = node.perm[t];
            if (axis < 0 || uint256(axis) >= rank || seen[uint256(axis)]) return (false, perm);
            seen[uint256(axis)] = true;
            perm[t] = axis;
        }
        return (true, perm);
    }

    ////////////////////////////////////////////////////////////////
    //                            Slice                           //
    ////////////////////////////////////////////////////////////////

    /// @notice Per data axis, the kept window after ONNX's clamping (`_slice_windows`, using
    ///         `opset.slice_bounds`); `ok` false on a refusal (parameter lengths differ, axis out
    ///         of range or repeated, zero step, INT32_MAX/INT64_MAX end with a negative step).
    function sliceWindows(NodeDescription.Node memory node, Signature memory sig)
        internal
        pure
        returns (bool ok, Window[] memory windows)
    {
        uint64[] memory data = sig.shapes[0];
        windows = new Window[](data.length);
        for (uint256 a = 0; a < data.length; ++a) windows[a] = Window(0, 1, data[a]);
        int256[] memory starts = sig.params[1];
        int256[] memory ends = sig.params[2];
        uint256 n = starts.length;
        bool hasAxes = node.present(3);
        bool hasSteps = node.present(4);
        if (ends.length != n || (hasAxes && sig.params[3].length != n)
                || (hasSteps && sig.params[4].length != n)) {
            return (false, windows);
        }
        bool[] memory seen = new bool[](data.length);
        for (uint256 i = 0; i < n; ++i) {
            uint256 axis;
            (ok, axis) = normalizeAxis(hasAxes ? sig.params[3][i] : int256(i), data.length);
            int256 step = hasSteps ? sig.params[4][i] : int256(1);
            if (!ok || seen[axis] || step == 0) return (false, windows);
            if (step < 0 && (ends[i] == INT32_MAX || ends[i] == INT64_MAX)) return (false, windows);
            seen[axis] = true;
            windows[axis] = _window(starts[i], ends[i], step, data[axis]);
        }
        return (true, windows);
    }

    /// @dev opset.slice_bounds, then the number of kept indices (0 on an empty axis).
    function _window(int256 start, int256 end, int256 step, uint64 dim)
        private
        pure
        returns (Window memory window)
    {
        int256 d = int256(uint256(dim));
        if (start < 0) start += d;
        if (end < 0) end += d;
        if (step > 0) {
            start = _clamp(start, 0, d);
            end = _clamp(end, 0, d);
        } else {
            start = _clamp(start, 0, d - 1);
            end = _clamp(end, -1, d - 1);
        }
        uint256 count = 0;
        if (dim != 0) {
            if (step > 0 && end > start) count = uint256((end - start + step - 1) / step);
            if (step < 0 && start > end) count = uint256((start - end - step - 1) / -step);
        }
        return Window(start, step, count);
    }

    function _clamp(int256 x, int256 low, int256 high) private pure returns (int256) {
        // max(x, low) then min(., high), as the reference: low > high gives high.
        if (x < low) x = low;
        return x > high ? high : x;
    }

    ////////////////////////////////////////////////////////////////
    //                  Indices and broadcasting                  //
    ////////////////////////////////////////////////////////////////

    /// @notice axis + rank for a negative axis; `ok` false outside [-rank, rank).
    function normalizeAxis(int256 axis, uint256 rank) internal pure returns (bool, uint256) {
        int256 r = int256(rank);
        if (axis < -r || axis >= r) return (false, 0);
        return (true, uint256(axis < 0 ? axis + r : axis));
    }

    /// @notice numpy's broadcast of two shapes (right-aligned; equal dims, or one of them 1).
    function broadcastShapes(uint64[] memory a, uint64[] memory b)
        internal
        pure
        returns (bool ok, uint64[] memory out)
    {
        uint256 rank = a.length > b.length ? a.length : b.length;
        out = new uint64[](rank);
        for (uint256 i = 0; i < rank; ++i) {
            // Axis i of the output, counted from the right as j.
            uint256 j = rank - 1 - i;
            uint64 da = j < a.length ? a[a.length - 1 - j] : 1;
            uint64 db = j < b.length ? b[b.length - 1 - j] : 1;
            if (da != db && da != 1 && db != 1) return (false, out);
            out[i] = da == 1 ? db : da;
        }
        return (true, out);
    }

    /// @notice The flat index in `inShape` that output multi-index `outMulti` (of an output with
    ///         rank `outRank`, right-aligned) reads under broadcasting: a size-1 axis reads 0.
    function broadcastFlat(uint256[] memory outMulti, uint256 outRank, uint64[] memory inShape)
        internal
        pure
        returns (uint256 flat)
    {
        uint256 skip = outRank - inShape.length;
        for (uint256 d = 0; d < inShape.length; ++d) {
            uint256 dim = inShape[d];
            flat = flat * dim + (dim == 1 ? 0 : outMulti[skip + d]);
        }
    }

    /// @notice The C-order multi-index of flat index `flat` in `shape` (flat < count, checked
    ///         by the caller).
    function unravel(uint256 flat, uint64[] memory shape)
        internal
        pure
        returns (uint256[] memory multi)
    {
        multi = new uint256[](shape.length);
        for (uint256 i = shape.length; i > 0; --i) {
            uint256 dim = shape[i - 1];
            multi[i - 1] = flat % dim;
            flat /= dim;
        }
    }

    /// @notice The flat C-order index of `multi` in `shape`.
    function ravel(uint256[] memory multi, uint64[] memory shape)
        internal
        pure
        returns (uint256 flat)
    {
        for (uint256 i = 0; i < shape.length; ++i) flat = flat * shape[i] + multi[i];
    }

    /// @notice Python's floor division (rounds toward minus infinity).
    function floorDiv(int256 a, int256 b) internal pure returns (int256 q) {
        q = a / b;
        if (a % b != 0 && ((a < 0) != (b < 0))) q -= 1;
    }

    function _saturatingMul(uint256 a, uint256 b) private pure returns (uint256) {
        uint256 product = a * b; // both <= PRODUCT_CAP = 2**128: no overflow
        return product > PRODUCT_CAP ? PRODUCT_CAP : product;
    }
}
