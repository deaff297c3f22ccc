"""What a node's records can be, and what each may become: one enum per record of the store
(`services/store.py`) and its allowed transitions, in one table.

The store guards every status write by this table: an update names the status it moves to,
and only a row in one of that status's predecessors changes (``UPDATE ... WHERE status IN``),
so a late or repeated writer (a restart, a second worker, an old event) can never move a
record backwards. The values are the strings stored in the database.
"""

from __future__ import annotations

from enum import StrEnum


class RequestStatus(StrEnum):
    """A posted request, as the node that may serve it sees it."""

    OPEN = "open"  # posted; nothing of this node's yet
    COMMITTING = "committing"  # answered: the output kept, its commit sent or about to be
    COMMITTED = "committed"  # a claim is on chain
    FINALIZED = "finalized"  # the claim was finalized: the answer is the verified one
    REJECTED = "rejected"  # the claim lost a dispute
    SKIPPED = "skipped"  # this node will not serve it (`note` says why)
    REFUNDED = "refunded"  # nobody answered in time: the consumer took its fee back


class ClaimStatus(StrEnum):
    """A committed output (``OutputCommitted``)."""

    COMMITTED = "committed"
    DISPUTED = "disputed"  # the provider defends it in a game
    FINALIZED = "finalized"
    SLASHED = "slashed"  # a game proved it wrong


class GameStatus(StrEnum):
    """One game as one of its players plays it."""

    OPEN = "open"
    WON = "won"
    LOST = "lost"


class ChallengeStatus(StrEnum):
    """A watchtower's challenge of one claim, recorded before its transaction is sent."""

    SENDING = "sending"
    OPENED = "opened"  # its game exists on chain
    FAILED = "failed"  # it will not be sent again (`note` says why)


#: Each kind's statuses and what each may become. A status may be its own successor where
#: writing it again is meaningful (a retried commit keeps `committing`; every move of a game
#: keeps it `open`). Keyed by kind first: the enums are strings, so RequestStatus.OPEN equals
#: GameStatus.OPEN and one flat table would merge them. One writer stands outside the table:
#: a reorganisation undoes what the lost blocks said (``store.outcomes_after``), finalized
#: and rejected included, since the chain no longer says it.
TRANSITIONS: dict[type[StrEnum], dict[StrEnum, frozenset[StrEnum]]] = {
    RequestStatus: {
        RequestStatus.OPEN: frozenset({RequestStatus.COMMITTING, RequestStatus.COMMITTED,
                                       RequestStatus.SKIPPED, RequestStatus.REFUNDED}),
        RequestStatus.COMMITTING: frozenset({RequestStatus.COMMITTING, RequestStatus.COMMITTED,
                                             RequestStatus.SKIPPED, RequestStatus.REFUNDED}),
        # (A reorganisation that took the commit sets it back, outside the table: below.)
        RequestStatus.COMMITTED: frozenset({RequestStatus.FINALIZED, RequestStatus.REJECTED}),
        RequestStatus.FINALIZED: frozenset(),
        RequestStatus.REJECTED: frozenset(),
        # What this node will not serve still follows the chain (services/events.py,
        # follow_outcome): another provider's answer, or the refund.
        RequestStatus.SKIPPED: frozenset({RequestStatus.COMMITTED, RequestStatus.REFUNDED}),
        RequestStatus.REFUNDED: frozenset(),
    },
    ClaimStatus: {
        ClaimStatus.COMMITTED: frozenset({ClaimStatus.DISPUTED, ClaimStatus.FINALIZED,
                                          ClaimStatus.SLASHED}),
        # Back to committed only when a reorganisation took the game (the provider's games
        # cursor, expected=DISPUTED).
        ClaimStatus.DISPUTED: frozenset({ClaimStatus.COMMITTED, ClaimStatus.FINALIZED,
                                         ClaimStatus.SLASHED}),
        ClaimStatus.FINALIZED: frozenset(),
        ClaimStatus.SLASHED: frozenset(),
    },
    GameStatus: {
        GameStatus.OPEN: frozenset({GameStatus.OPEN, GameStatus.WON, GameStatus.LOST}),
        GameStatus.WON: frozenset(),
        GameStatus.LOST: frozenset(),
    },
    ChallengeStatus: {
        ChallengeStatus.SENDING: frozenset({ChallengeStatus.OPENED, ChallengeStatus.FAILED}),
        ChallengeStatus.OPENED: frozenset(),
        ChallengeStatus.FAILED: frozenset(),
    },
}


def successors(status: StrEnum) -> frozenset[StrEnum]:
    """What `status` may become."""
    return TRANSITIONS[type(status)][status]


def predecessors(status: StrEnum) -> tuple[StrEnum, ...]:
    """The statuses of its own kind from which `status` may be reached, in the enum's order."""
    return tuple(s for s in type(status) if status in successors(s))


def check_transition_guard(status: StrEnum, expected: StrEnum | tuple[StrEnum, ...] | None
                           ) -> tuple[StrEnum, ...]:
    """The statuses an update to `status` may start from: `expected` (narrower than the table
    allows, for a writer that knows more) or else every predecessor. A guard that allows what
    the table does not is a bug in the caller."""
    allowed = predecessors(status)
    if expected is None:
        return allowed
    chosen = (expected,) if isinstance(expected, str) else tuple(expected)
    stray = [s for s in chosen if s not in allowed]
    if stray:
        raise ValueError(f"{type(status).__name__}: {', '.join(stray)} may not become {status}")
    return chosen
