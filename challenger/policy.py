"""The watchtower's decisions, as pure functions: which claims to verify, what a verification
means for the claim, which moves may be sent and when to look at a game again.

The game moves themselves are ``prover.game.decide``; everything here decides around it. No
function reads the chain, the database or the clock: callers pass what they read.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from optinfer.prover import game as spec


class Verdict(enum.Enum):
    """What the watchtower concluded about a claim (stored in ``claims.verdict``)."""

    VALID = "valid"  # the teacher-forced pass gives exactly the claimed tokens, ending right
    # The dispute game convicts it, so it is challenged: a claimed token is not the model's
    # prediction (an id outside the vocabulary never is one), or the model has no value for
    # the claim's inputs (an id outside the vocabulary in the prompt or before the last token).
    INVALID = "invalid"
    # Every token is the model's, yet the output ends wrongly (stops early, runs past EOS):
    # the game checks the tokens only, and a provider defending their honest trace wins it.
    # Reported and counted (claims_verified_total{verdict="unprovable"}), never challenged.
    UNPROVABLE = "unprovable"
    UNVERIFIABLE = "unverifiable"  # the model is not held here or its roots do not match
    UNSAMPLED = "unsampled"  # left out by the sampling rate


@dataclass(frozen=True)
class HeldModel:
    """The integer model this watchtower runs. `model_id` is the registry id of its files'
    roots and node count with its manifest's op set, hash, max context and EOS ids
    (``ModelSpec.model_id``, at start-up): a registration under that id is this very model."""

    model_id: bytes
    nodes_root: bytes
    constants_root: bytes
    opset_version: int
    node_count: int
    max_context: int = 0
    eos_token_ids: tuple[int, ...] = ()


def sampled(request_id: int, rate: float, salt: bytes) -> bool:
    """Whether the claim on `request_id` is among the share `rate` of claims to verify.

    Deterministic (every worker agrees, a re-delivered task decides the same) and keyed by a
    `salt` the provider does not know, so it cannot tell which of its claims go unchecked.
    """
    if rate >= 1:
        return True
    digest = hashlib.sha256(salt + request_id.to_bytes(32, "big")).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2**64


def model_problem(model_id: bytes, held: HeldModel | None, registered: bool) -> str | None:
    """Why a claim on model `model_id` cannot be checked here, or None when it can: the
    watchtower must hold that very model and the registry must know it. The registry computed
    the id from the roots and node count a game opens against and from the max context and
    EOS ids the coordinator judges by, so the held model's id equal to it means all of them
    are the held model's."""
    if held is None:
        return "this watchtower holds no usable model"
    if held.model_id != model_id:
        return (f"model 0x{model_id.hex()} is not held here "
                f"(this watchtower runs 0x{held.model_id.hex()})")
    if not registered:
        return f"model 0x{model_id.hex()} is not registered"
    return None


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    note: str
    challenge: bool


def judge(valid: bool, reason: str, convictable: bool) -> Judgement:
    """The claim's verdict from the teacher-forced verification (`valid`, with its `reason`)
    and whether the dispute game convicts it (`convictable`: a claimed token differs from the
    model's prediction, or the op set refuses the claim's inputs). Every convictable claim is
    challenged; unprovable is left for the others, which a provider wins by playing its
    honest trace: that trace ends in the claimed tokens."""
    if valid:
        return Judgement(Verdict.VALID, reason, False)
    if convictable:
        return Judgement(Verdict.INVALID, reason, True)
    return Judgement(Verdict.UNPROVABLE, reason + "; every token is the model's, so the dispute "
                     "game cannot convict it", False)


def window_open(challenge_deadline: int, now: float) -> bool:
    """Whether a challenge sent at chain time `now` can still be accepted."""
    return now < challenge_deadline


# ------------------------------------------------------------------------------------ games


def next_check(state: spec.GameState, now: float, poll_interval: float) -> float:
    """Seconds until the game is worth reading again: the poll interval, or sooner when the
    provider's clock runs out before it (the timeout is claimed then)."""
    if state.to_move is not spec.Role.PROVIDER:
        return poll_interval
    left = state.clock.remaining(spec.Role.PROVIDER, now)
    return max(0.0, min(poll_interval, left + 1))


def clocks(state: spec.GameState, now: float) -> dict[str, float]:
    """Seconds left on each party's clock at `now` (for the metrics)."""
    return {role.value: max(0.0, state.clock.remaining(role, now)) for role in spec.Role}
