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
    /// @dev    Per 32-byte word: the B range check is one mask over the whole word (a byte is
    ///         in [-64, 63] iff its bits 7 and 6 agree), then 32 unrolled byte products with
    ///         literal byte indices. About 25 gas per byte; the last K mod 32 bytes one by one.
    function dot(uint256 aOffset, uint256 bOffset, uint256 k, int256 zeroPoint)
        internal
        pure
        returns (bool ok, int256 total)
    {
        if (k == 0 || k > MATMUL_MAX_K) return (false, 0);
        uint256 outOfRange = 0;
        assembly {
            let end := add(aOffset, shl(5, shr(5, k)))
            let shift := sub(bOffset, aOffset)
            for { let at := aOffset } lt(at, end) { at := add(at, 0x20) } {
                let wa := calldataload(at)
                let wb := calldataload(add(at, shift))
                outOfRange := or(outOfRange, xor(wb, shl(1, wb)))
                total := add(total, add(add(mul(sub(byte(0, wa), zeroPoint), signextend(0, byte(0, wb))), mul(sub(byte(1, wa), zeroPoint), signextend(0, byte(1, wb)))),
                    add(mul(sub(byte(2, wa), zeroPoint), signextend(0, byte(2, wb))), mul(sub(byte(3, wa), zeroPoint), signextend(0, byte(3, wb))))))
                total := add(total, add(add(mul(sub(byte(4, wa), zeroPoint), signextend(0, byte(4, wb))), mul(sub(byte(5, wa), zeroPoint), signextend(0, byte(5, wb)))),
                    add(mul(sub(byte(6, wa), zeroPoint), signextend(0, byte(6, wb))), mul(sub(byte(7, wa), zeroPoint), signextend(0, byte(7, wb))))))
                total := add(total, add(add(mul(sub(byte(8, wa), zeroPoint), signextend(0, byte(8, wb))), mul(sub(byte(9, wa), zeroPoint), signextend(0, byte(9, wb)))),
                    add(mul(sub(byte(10, wa), zeroPoint), signextend(0, byte(10, wb))), mul(sub(byte(11, wa), zeroPoint), signextend(0, byte(11, wb))))))
                total := add(total, add(add(mul(sub(byte(12, wa), zeroPoint), signextend(0, byte(12, wb))), mul(sub(byte(13, wa), zeroPoint), signextend(0, byte(13, wb)))),
                    add(mul(sub(byte(14, wa), zeroPoint), signextend(0, byte(14, wb))), mul(sub(byte(15, wa), zeroPoint), signextend(0, byte(15, wb))))))
                total := add(total, add(add(mul(sub(byte(16, wa), zeroPoint), signextend(0, byte(16, wb))), mul(sub(byte(17, wa), zeroPoint), signextend(0, byte(17, wb)))),
                    add(mul(sub(byte(18, wa), zeroPoint), signextend(0, byte(18, wb))), mul(sub(byte(19, wa), zeroPoint), signextend(0, byte(19, wb))))))
                total := add(total, add(add(mul(sub(byte(20, wa), zeroPoint), signextend(0, byte(20, wb))), mul(sub(byte(21, wa), zeroPoint), signextend(0, byte(21, wb)))),
                    add(mul(sub(byte(22, wa), zeroPoint), signextend(0, byte(22, wb))), mul(sub(byte(23, wa), zeroPoint), signextend(0, byte(23, wb))))))
                total := add(total, add(add(mul(sub(byte(24, wa), zeroPoint), signextend(0, byte(24, wb))), mul(sub(byte(25, wa), zeroPoint), signextend(0, byte(25, wb)))),
                    add(mul(sub(byte(26, wa), zeroPoint), signextend(0, byte(26, wb))), mul(sub(byte(27, wa), zeroPoint), signextend(0, byte(27, wb))))))
                total := add(total, add(add(mul(sub(byte(28, wa), zeroPoint), signextend(0, byte(28, wb))), mul(sub(byte(29, wa), zeroPoint), signextend(0, byte(29, wb)))),
                    add(mul(sub(byte(30, wa), zeroPoint), signextend(0, byte(30, wb))), mul(sub(byte(31, wa), zeroPoint), signextend(0, byte(31, wb))))))
            }
            // The tail, byte by byte.
            for { let at := end } lt(at, add(aOffset, k)) { at := add(at, 1) } {
                let raw := byte(0, calldataload(add(at, shift)))
                outOfRange := or(outOfRange, xor(raw, shl(1, raw)))
                total := add(total, mul(sub(byte(0, calldataload(at)), zeroPoint), signextend(0, raw)))
            }
        }
        // Bit 7 of any byte set: that byte's bits 7 and 6 differed.
        if (outOfRange & 0x8080808080808080808080808080808080808080808080808080808080808080 != 0) {
            return (false, 0);
        }
        return (true, total);
    }
}
