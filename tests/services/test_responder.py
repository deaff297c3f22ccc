"""The game responder's pure parts: what the journal keeps of a move, and its log names. Its
turns on chain are tested through both nodes (tests/provider/test_defending.py,
tests/challenger/)."""

from __future__ import annotations

import json

from optinfer.prover import game as spec
from optinfer.services.responder import describe, move_summary


def test_a_move_is_journaled_as_plain_json_without_its_bulk():
    move = spec.RevealLeaf(k=3, tensor_root=b"\x01" * 32, dtype=7, shape=(1, 2),
                           data_root=b"\x02" * 32, path=(b"\x03" * 32, b"\x04" * 32))
    kept = move_summary(move)
    assert json.loads(json.dumps(kept)) == kept
    # Roots and the header in full (a structural lie shows in them); a path by its length.
    assert kept == {"k": 3, "tensor_root": "0x" + "01" * 32, "dtype": 7, "shape": [1, 2],
                    "data_root": "0x" + "02" * 32, "path": 2}
    assert move_summary(spec.RevealChildren(children=(b"\x05" * 32,) * 16)) == {"children": 16}
    assert move_summary(spec.Timeout()) == {}
    witness = type("Witness", (), {"k": 5, "out_index": 3})()
    assert move_summary(spec.OneStep(witness)) == {"k": 5, "element": 3}


def test_a_retried_move_has_the_same_summary_another_move_not():
    first = spec.PostMid(mid=449, state_root=b"\x11" * 32)
    assert move_summary(first) == move_summary(spec.PostMid(mid=449, state_root=b"\x11" * 32))
    assert move_summary(first) != move_summary(spec.PostMid(mid=449, state_root=b"\x12" * 32))


def test_a_move_s_log_name_leaves_out_the_hashes():
    assert describe(spec.PostMid(mid=449, state_root=b"\x11" * 32)) == "PostMid(mid=449)"
    assert describe(spec.RevealChildren(children=(b"\x05" * 32,) * 16)) == \
        "RevealChildren(children=16)"
