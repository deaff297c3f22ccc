// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {Commitments} from "./Commitments.sol";
import {NodeDescription} from "./NodeDescription.sol";

/// @title OneStepOps
/// @notice The element semantics of the op set (docs/opset.md, `optinfer.models.opset`), on
///         elements read straight from calldata: wrapping int32/int64 arithmetic, truncating
///         Div, Cast keeping the low bits, reductions, ArgMax's first maximum, and the
///         MatMulInteger dot product of a uint8 row and an int8 row.
/// @dev    Every function returns `ok = false` where the op set refuses its inputs (an
///         OpSemanticsError in the reference: wrong dtypes, a zero divisor, INT_MIN / -1, a
///         ReduceSum outside its exactness bound, an empty ReduceMax/ArgMax, MatMulInteger's B
///         outside [-64, 63] or K outside [1, 131586]): the caller then rules for the
///         challenger, since the agreed inputs have no result the provider could have claimed.
library OneStepOps {
    /// @notice Largest K for which |sum_k (A - zp) * B| <= K * 255 * 64 fits int32.
    uint256 internal constant MATMUL_MAX_K = 131586;
    /// @notice ONNX Runtime's ReduceSum accumulates in double, exact up to 2**53.
    int256 internal constant DOUBLE_EXACT_LIMIT = 2 ** 53;

    ////////////////////////////////////////////////////////////////
    //                       Element decoding                     //
    ////////////////////////////////////////////////////////////////

    /// @notice The element of `dtype` whose little-endian bytes start at calldata `offset`,
    ///         sign-extended for int8/int32/int64 (bool and uint8 as 0..255; bool bytes are
    ///         checked when opened).
    function load(uint8 dtype, uint256 offset) internal pure returns (int256 value) {
        assembly {
            let word := calldataload(offset)
            switch dtype
            case 6 {
                // int32: bytes b0 b1 b2 b3 at the word's top; value = b3 b2 b1 b0.
                let x := shr(224, word)
                x := or(shr(24, x), or(and(shr(8, x), 0xff00), or(and(shl(8, x), 0xff0000),
                    and(shl(24, x), 0xff000000))))
                value := signextend(3, x)
            }
            case 7 {
                let x := shr(192, word)
                // Swap bytes, then 16-bit halves, then 32-bit halves.
                x := or(and(shr(8, x), 0x00ff00ff00ff00ff), and(shl(8, x), 0xff00ff00ff00ff00))
                x := or(and(shr(16, x), 0x0000ffff0000ffff), and(shl(16, x), 0xffff0000ffff0000))
                x := or(shr(32, x), and(shl(32, x), 0xffffffff00000000))
                value := signextend(7, x)
            }
            case 3 { value := signextend(0, shr(248, word)) }
            default { value := shr(248, word) }
        }
    }

    /// @notice `x` reduced modulo 2**w into the range of the signed dtype of w bits (int32,
    ///         int64), or of uint8/int8/bool's storage: what a wrapping op or Cast yields.
    function wrap(int256 x, uint8 dtype) internal pure returns (int256 value) {
        if (dtype == Commitments.DTYPE_INT64) {
            assembly { value := signextend(7, x) }
        } else if (dtype == Commitments.DTYPE_INT32) {
            assembly { value := signextend(3, x) }
        } else if (dtype == Commitments.DTYPE_INT8) {
            assembly { value := signextend(0, x) }
        } else if (dtype == Commitments.DTYPE_UINT8) {
            value = int256(uint256(x) & 0xff);
        } else {
            value = x != 0 ? int256(1) : int256(0); // bool: x != 0
        }
    }

    /// @notice Whether `dtype` is an arithmetic dtype (int32 or int64).
    function isArithmetic(uint8 dtype) internal pure returns (bool) {
        return dtype == Commitments.DTYPE_INT32 || dtype == Commitments.DTYPE_INT64;
    }

    ////////////////////////////////////////////////////////////////
    //                         Element-wise                       //
    ////////////////////////////////////////////////////////////////

    /// @notice Add, Sub, Mul (wrapping), Div (truncating), Min, Max, Greater (0/1) of two
    ///         elements of dtypes `da`, `db` (both int32 or both int64, else refused).
    function elementwise(uint8 op, uint8 da, uint8 db, int256 a, int256 b)
        internal
        pure
        returns (bool ok, int256 value)
    {
        if (!isArithmetic(da) || da != db) return (false, 0);
        unchecked {
            if (op == NodeDescription.ADD) return (true, wrap(a + b, da));
            if (op == NodeDescription.SUB) return (true, wrap(a - b, da));
            // |a * b| < 2**126 for int64 operands: the 256-bit product is exact.
            if (op == NodeDescription.MUL) return (true, wrap(a * b, da));
        }
        if (op == NodeDescription.DIV) {
            int256 intMin = da == Commitments.DTYPE_INT32
                ? int256(type(int32).min)
                : int256(type(int64).min);
            if (b == 0 || (a == intMin && b == -1)) return (false, 0);
            return (true, a / b); // Solidity's signed division truncates toward zero.
        }
        if (op == NodeDescription.MIN) return (true, a < b ? a : b);
        if (op == NodeDescription.MAX) return (true, a > b ? a : b);
        return (true, a > b ? int256(1) : int256(0)); // Greater
    }

    /// @notice Clip(x, min, max) with optional bounds, all of one arithmetic dtype: max(x, min)
    ///         then min(., max), so min > max gives max.
    function clip(
        uint8 dtype,
        int256 x,
        bool hasLow,
        uint8 lowDtype,
        int256 low,
        bool hasHigh,
        uint8 highDtype,
        int256 high
    ) internal pure returns (bool ok, int256 value) {
        if (!isArithmetic(dtype)) return (false, 0);
        if ((hasLow && lowDtype != dtype) || (hasHigh && highDtype != dtype)) return (false, 0);
        value = x;
        if (hasLow && value < low) value = low;
        if (hasHigh && value > high) value = high;
        return (true, value);
    }

    ////////////////////////////////////////////////////////////////
    //                         Reductions                         //
    ////////////////////////////////////////////////////////////////

    /// @notice ReduceSum over `count` elements of `dtype` at calldata `offsets[i]` runs of
    ///         `lengths[i]` elements: exact, refused unless every element is within
    ///         2**53 / n in magnitude and the sum fits the dtype.
    function reduceSum(uint8 dtype, uint256[] memory offsets, uint256[] memory lengths)
        internal
        pure
        returns (bool ok, int256 total)
    {
        if (!isArithmetic(dtype)) return (false, 0);
        uint256 n = 0;
        for (uint256 r = 0; r < lengths.length; ++r) n += lengths[r];
        if (n == 0) return (true, 0);
        int256 bound = DOUBLE_EXACT_LIMIT / int256(n);
        uint256 size = dtype == Commitments.DTYPE_INT32 ? 4 : 8;
        for (uint256 r = 0; r < offsets.length; ++r) {
            uint256 end = offsets[r] + lengths[r] * size;
            for (uint256 at = offsets[r]; at < end; at += size) {
                int256 x = load(dtype, at);
                if (x > bound || x < -bound) return (false, 0);
                total += x;
            }
        }
        if (wrap(total, dtype) != total) return (false, 0);
        return (true, total);
    }

    /// @notice ReduceMax (`argMax` false) or ArgMax (true: the index of the FIRST maximum in
    ///         the runs' order) over the runs; refused when empty or not int32/int64.
    function reduceMax(
        uint8 dtype,
        uint256[] memory offsets,
        uint256[] memory lengths,
        bool argMax
    ) internal pure returns (bool ok, int256) {
        if (!isArithmetic(dtype)) return (false, 0);
        uint256 size = dtype == Commitments.DTYPE_INT32 ? 4 : 8;
        int256 best = type(int256).min;
        uint256 bestIndex = 0;
        uint256 index = 0;
        for (uint256 r = 0; r < offsets.length; ++r) {
            uint256 end = offsets[r] + lengths[r] * size;
            for (uint256 at = offsets[r]; at < end; at += size) {
                int256 x = load(dtype, at);
                // Strictly greater: ties keep the first index.
                if (x > best) (best, bestIndex) = (x, index);
                ++index;
            }
        }
        if (index == 0) return (false, 0);
        return (true, argMax ? int256(bestIndex) : best);
    }

    ////////////////////////////////////////////////////////////////
    //                        MatMulInteger                       //
    ////////////////////////////////////////////////////////////////

    /// @notice sum_t (A[t] - zp) * B[t] over K bytes of a uint8 row at calldata `aOffset` and
    ///         an int8 row at `bOffset`; refused when some B byte is outside [-64, 63] or K is
    ///         outside [1, 131586].
    /// @dev    Whole 32-byte words are multiplied as packed lanes (about 10 gas per byte instead
    ///         of about 45 byte by byte), the last K mod 32 bytes one by one. With b' = b + 64 in
    ///         [0, 127] (B in range: `(byte ^ 0x40) & 0x7f`), the sum is
    ///             sum a*b' - 64 * sum a - zp * sum b' + 64 * zp * K.
    ///         Word layout: eight 32-bit lanes; group g (0..3) masks byte g of every lane, so
    ///         each lane holds one byte. B's word has its lanes reversed once, so in
    ///         xa_g * rev(xb_g) the top lane (bits 224..255) is sum_L xa_g[L] * xb_g[L]: the
    ///         other lanes' coefficients are below 8 * 255 * 127 < 2**32 and never carry into
    ///         it. sum a and sum b' are kept per lane (below 4 * 255 * 4112 < 2**32 for any K)
    ///         and summed across lanes once at the end, by the same top-lane product with
    ///         a word of ones.
    ///         The range check is one mask per word: a byte is in [-64, 63] iff its bits 7
    ///         and 6 agree.
    function dot(uint256 aOffset, uint256 bOffset, uint256 k, int256 zeroPoint)
        internal
        pure
        returns (bool ok, int256 total)
    {
        if (k == 0 || k > MATMUL_MAX_K) return (false, 0);
        uint256 outOfRange = 0;
        uint256 products = 0;
        uint256 laneSumA = 0;
        uint256 laneSumB = 0;
        int256 tail = 0;
        uint256 wholeBytes = (k >> 5) << 5;
        assembly {
            let byteLanes := 0x000000ff000000ff000000ff000000ff000000ff000000ff000000ff000000ff
            let end := add(aOffset, wholeBytes)
            let shift := sub(bOffset, aOffset)
            for { let at := aOffset } lt(at, end) { at := add(at, 0x20) } {
                let wa := calldataload(at)
                let wb := calldataload(add(at, shift))
                outOfRange := or(outOfRange, xor(wb, shl(1, wb)))
                // b' = b + 64 per byte, then the 32-bit lanes reversed: halves, quarters, lanes.
                wb := and(xor(wb, 0x4040404040404040404040404040404040404040404040404040404040404040),
                    0x7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f)
                wb := or(shl(128, wb), shr(128, wb))
                let low64 := 0x0000000000000000ffffffffffffffff0000000000000000ffffffffffffffff
                wb := or(shl(64, and(wb, low64)), and(shr(64, wb), low64))
                let low32 := 0x00000000ffffffff00000000ffffffff00000000ffffffff00000000ffffffff
                wb := or(shl(32, and(wb, low32)), and(shr(32, wb), low32))
                // Groups g = 0, 8, 16, 24: byte g/8 of every lane, unrolled.
                let xa := and(wa, byteLanes)
                let xb := and(wb, byteLanes)
                products := add(products, shr(224, mul(xa, xb)))
                laneSumA := add(laneSumA, xa)
                laneSumB := add(laneSumB, xb)
                xa := and(shr(8, wa), byteLanes)
                xb := and(shr(8, wb), byteLanes)
                products := add(products, shr(224, mul(xa, xb)))
                laneSumA := add(laneSumA, xa)
                laneSumB := add(laneSumB, xb)
                xa := and(shr(16, wa), byteLanes)
                xb := and(shr(16, wb), byteLanes)
                products := add(products, shr(224, mul(xa, xb)))
                laneSumA := add(laneSumA, xa)
                laneSumB := add(laneSumB, xb)
                xa := and(shr(24, wa), byteLanes)
                xb := and(shr(24, wb), byteLanes)
                products := add(products, shr(224, mul(xa, xb)))
                laneSumA := add(laneSumA, xa)
                laneSumB := add(laneSumB, xb)
            }
            for { let at := end } lt(at, add(aOffset, k)) { at := add(at, 1) } {
                let raw := byte(0, calldataload(add(at, shift)))
                outOfRange := or(outOfRange, xor(raw, shl(1, raw)))
                tail := add(tail, mul(sub(byte(0, calldataload(at)), zeroPoint), signextend(0, raw)))
            }
        }
        // Bit 7 of any byte set: that byte's bits 7 and 6 differed.
        if (outOfRange & 0x8080808080808080808080808080808080808080808080808080808080808080 != 0) {
            return (false, 0);
        }
        uint256 ones = 0x0000000100000001000000010000000100000001000000010000000100000001;
        int256 sumA;
        int256 sumB;
        unchecked {
            // Modulo 2**256 on purpose: only the top lane is kept.
            sumA = int256((laneSumA * ones) >> 224);
            sumB = int256((laneSumB * ones) >> 224);
        }
        total = int256(products) - 64 * sumA - zeroPoint * sumB + 64 * zeroPoint * int256(wholeBytes)
            + tail;
        return (true, total);
    }
}
