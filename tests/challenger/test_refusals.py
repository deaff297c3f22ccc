"""Claims the model has no answer for, through the watchtower in eager mode and the real
contracts on anvil (issue 17 point 4): an output token id outside the vocabulary at the first,
a middle or the last position, or one in the prompt. The coordinator takes any uint32 id; the
watchtower used to call such a claim unprovable (its trace builder refused the id) and walk
away, although the game convicts it. Now it challenges and wins, and keeps `unprovable` (still
counted) for claims whose every token is the model's.
"""

from __future__ import annotations

import pytest

from optinfer.challenger import tasks
from optinfer.challenger.policy import Verdict
from optinfer.prover.game import ModelTrace, Role
from optinfer.services import store as st
from tests.challenger.conftest import BOND, MAX_TOKENS, honest_answer, tiny
from tests.challenger.test_eager import (  # noqa: F401  (`watchtower` is a fixture)
    SLASH_SHARE,
    claim_row,
    metric,
    play_out,
    watchtower,
)
from tests.claim_lies import final_liar, oov_liar

OOV = 2**32 - 1  # the largest id the coordinator takes


def with_id(tokens, position: int, token: int = OOV) -> list[int]:
    changed = list(tokens)
    changed[position] = token
    return changed


@pytest.mark.parametrize("where", ["first", "middle", "last", "prompt"])
def test_an_id_outside_the_vocabulary_is_challenged_and_convicted_on_chain_point4(
        stack, watchtower, where):  # noqa: F811
    model = tiny()
    prompt, answer = map(list, honest_answer("12+34="))
    if where == "prompt":
        prompt, output = with_id(prompt, 1, model.vocab_size), answer
    else:
        output = with_id(answer, {"first": 0, "middle": 6, "last": len(answer) - 1}[where])
    # An answer not ending in EOS must be max tokens long to be committed at all.
    request_id = stack.post(prompt, len(output) if where == "last" else MAX_TOKENS)
    stack.coordinator.commit_output_send(request_id, output, stack.provider)
    before = stack.watchtower_reward()
    invalid = metric("claims_verified_total", verdict="invalid")

    tasks.scan.delay()
    claim = claim_row(watchtower, request_id)
    assert claim.verdict == Verdict.INVALID.value, claim.verdict_note
    if where == "last":
        assert f"token {len(output) - 1} is {OOV}" in claim.verdict_note
    else:
        assert "outside the vocabulary" in claim.verdict_note
        assert "embed.rows" in claim.verdict_note
    assert metric("claims_verified_total", verdict="invalid") == invalid + 1
    (game_id,) = stack.games_of(request_id)

    honest = ModelTrace.from_claim(model, prompt, output)
    if where == "last":
        liar = final_liar(honest, output)
    else:  # the middle one commits, at the embedding, the very stand-in the watchtower holds
        liar = oov_liar(model, honest, prompt, output, stand_in=where == "middle")
    state = play_out(stack, game_id, liar)
    assert (state.winner, state.reason) == (Role.CHALLENGER, "one-step")
    if where == "last":
        assert (state.k, state.element) == (honest.node_count, len(output) - 1)
    else:
        assert (state.k, state.element) == (honest.refusal.k, honest.refusal.element)
    assert stack.watchtower_reward() == before + BOND + SLASH_SHARE


def test_unprovable_is_only_a_claim_whose_every_token_is_the_models_and_is_counted_point4(
        stack, watchtower):  # noqa: F811
    """A claim the coordinator would refuse (it stops before EOS and max tokens; only a model
    registered otherwise than it runs could let one through), put in the database as if
    seen: every token is the model's, so the game cannot convict it. Reported as unprovable,
    counted in the metrics, not challenged."""
    prompt, answer = map(list, honest_answer("5+7="))
    request_id = 10**9
    with watchtower.store.transaction() as conn:
        st.upsert_request(conn, st.RequestRecord(
            request_id=request_id, consumer=stack.consumer.address,
            model_id="0x" + stack.model_id.hex(), prompt=prompt, max_tokens=MAX_TOKENS, fee=0,
            callback="0x" + "00" * 20, callback_gas_limit=0, named_provider="0x" + "00" * 20,
            commit_deadline=2**40, block_number=1, tx_hash="0x" + "11" * 32))
        st.record_claim(conn, st.ClaimRecord(
            request_id=request_id, provider=stack.provider.address, output=answer[:-3],
            challenge_deadline=2**40, block_number=1, tx_hash="0x" + "22" * 32))
    unprovable = metric("claims_verified_total", verdict="unprovable")
    result = watchtower.verify(request_id)
    assert result.verdict is Verdict.UNPROVABLE and result.game is None
    assert "stops before EOS" in claim_row(watchtower, request_id).verdict_note
    assert metric("claims_verified_total", verdict="unprovable") == unprovable + 1
    with watchtower.store.transaction() as conn:
        assert st.get_challenge(conn, request_id, watchtower.address) is None
