"""Verified datasets (issue 23) on a real anvil with tiny-r1: a dataset of 50 prompts built
through the network with an honest provider, a lying one and a watchtower running (the demo's
actors, in-process: SQLite, Celery eager), one lie caught, slashed and its prompt posted
again; `dataset verify` passing on it and naming the record whose token was edited; the
Hugging Face `datasets` library loading it; and a build that resumes after a crash at each
point of a post without posting anything twice."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from optinfer.contracts.coordinator import InferenceCoordinator, Status
from optinfer.models.tiny_r1 import held_out_problems
from optinfer.services.dataset import (
    CARD_FILE,
    JSONL_FILE,
    PARQUET_FILE,
    ChainView,
    check_record,
    read_rows,
    split_reasoning,
)
from optinfer.services.dataset_build import BuildOptions, DatasetBuilder, Prompt, read_prompts

OPTINFER = str(Path(sys.executable).parent / "optinfer")
MAX_TOKENS = 48
FEE = 10**15

pytestmark = pytest.mark.xdist_group("dataset")  # one world (chain and actors) per run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo's chain, contracts and actors (honest provider, liar, eager watchtower)."""
    from optinfer.contracts.localchain import start_anvil
    from optinfer.services.demo import Demo

    workdir = tmp_path_factory.mktemp("world")
    with start_anvil() as chain:
        demo = Demo(chain, workdir, lambda *_: None, "12+34=")
        demo.deploy()
        # The honest provider stakes for a batch of claims at a time (0.5 ETH locked by
        # each), before its node starts and owns its key.
        InferenceCoordinator(demo.w3, demo.deployments.address("InferenceCoordinator")) \
            .register_provider_send(20 * 10**18, chain.accounts[1])
        demo.start_actors()
        yield demo
        demo.honest.close()
        demo.liar.close()


def builder_for(world, prompts: list[Prompt], out_dir: Path, **options) -> DatasetBuilder:
    from optinfer.contracts.sender import TxSender

    view = ChainView.of(world.w3, world.deployments)
    sender = TxSender(world.w3, world.chain.accounts[3])
    options = BuildOptions(max_tokens=MAX_TOKENS, fee=FEE, **options)
    return DatasetBuilder(view, sender, world.model, prompts, out_dir, options,
                          say=lambda *_: None)


def prompts_file(tmp_path: Path, count: int, seed: int) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(p.prompt + "\n" for p in held_out_problems(count, seed=seed)))
    return path


def finish(world, builder: DatasetBuilder, serve=None, rounds: int = 400) -> dict:
    """Step the builder, the honest provider and the watchtower until every prompt is final,
    moving the chain's clock past the challenge window whenever every claim waits on it."""
    from optinfer.services.demo import CHALLENGE_WINDOW

    serve = serve or [world.honest.poll_once]
    for _ in range(rounds):
        counts = builder.step()
        if counts.done:
            return builder.finish(counts)
        for act in serve:
            act()
        world.scan.delay()
        if counts.committed and not counts.open and not counts.disputed:
            world.advance(CHALLENGE_WINDOW)
    raise AssertionError(f"the build did not finish: {builder.counts().line()}")


def test_split_reasoning():
    assert split_reasoning("<think>1+2=03</think>3") == ("1+2=03", "3")
    assert split_reasoning("step by step</think>\n\nParis.") == ("step by step", "Paris.")
    assert split_reasoning("no reasoning here") == (None, "no reasoning here")


def test_fifty_prompts_with_a_lie_caught_are_built_verified_and_loaded(world, tmp_path):
    """The issue's whole flow: one provider lie among the answers is caught by the watchtower,
    slashed, and its prompt posted again; the 50 records verify against the chain (and
    recompute), load with `datasets`, and an edited token is named by `dataset verify`."""
    out = tmp_path / "dataset"
    prompts = read_prompts(prompts_file(tmp_path, 50, seed=11), world.model)
    builder = builder_for(world, prompts, out, formats=("parquet", "jsonl"))
    coordinator = world.coordinator
    # The first request alone, answered by the liar: a lie in its last token.
    builder.options = dataclasses.replace(builder.options, concurrency=1)
    builder.step()
    world.liar.poll_once()
    lied = coordinator.parameter("requestCount")
    assert coordinator.get_request(lied).status is Status.COMMITTED
    world.scan.delay()  # the watchtower challenges it
    world.run_until(lambda: coordinator.get_request(lied).status is Status.REJECTED,
                    [world.liar.poll_once, world.scan.delay], "the lie's dispute")
    builder.options = dataclasses.replace(builder.options, concurrency=8)
    summary = finish(world, builder)
    builder.close()

    assert summary["records"] == 50 and summary["complete"] and not summary["failed"]
    assert summary["slashed_and_reposted"] == 1
    rows = read_rows(out)
    assert [row["id"] for row in rows] == [str(i) for i in range(50)]
    assert len({row["request_id"] for row in rows}) == 50 and lied not in {
        row["request_id"] for row in rows}
    first = rows[0]
    assert first["prompt"] == prompts[0].text and first["prompt_tokens"] == prompts[0].tokens
    assert first["answer"] == world.model.decode_text(first["answer_tokens"])
    assert first["final_answer"] == str(sum(map(int, prompts[0].text.rstrip("=").split("+"))))
    assert first["reasoning"].count("+") >= 2 and first["model_root"] == \
        world.model.manifest["model_root"]
    assert first["finalize_block"] > first["commit_block"]
    assert len((out / JSONL_FILE).read_text().splitlines()) == 50
    card = (out / CARD_FILE).read_text()
    assert "answers slashed and their prompts posted again: 1" in card
    assert "optinfer dataset verify DIR" in card

    view = ChainView.of(world.w3, world.deployments)
    assert all(check_record(row, view, world.model, recompute=True) is None for row in rows)

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / PARQUET_FILE),
                                   split="train")
    assert loaded.num_rows == 50 and loaded[0]["answer_tokens"] == first["answer_tokens"]
    assert loaded[0]["request_id"] == first["request_id"]

    env = {**os.environ, "OPTINFER_RPC_URL": world.chain.url,
           "OPTINFER_DEPLOYMENTS": str(world.workdir / "deployments.json"),
           "OPTINFER_STATE_DIR": str(tmp_path / "state")}
    passed = subprocess.run([OPTINFER, "dataset", "verify", str(out), "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert passed.returncode == 0, passed.stderr
    assert json.loads(passed.stdout) == {"records": 50, "bad": {}, "ok": True,
                                         "recomputed": False}

    table = pq.read_table(out / PARQUET_FILE).to_pylist()
    table[17]["answer_tokens"][2] += 1  # one token of one record
    pq.write_table(pq.read_table(out / PARQUET_FILE).from_pylist(
        table, schema=pq.read_table(out / PARQUET_FILE).schema), out / PARQUET_FILE)
    failed = subprocess.run([OPTINFER, "dataset", "verify", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "record 17: answer_tokens is" in failed.stdout
    assert "1 bad" in failed.stdout and "record 16" not in failed.stdout


@pytest.mark.parametrize("crash", ["before_send", "before_receipt"])
def test_a_build_stopped_inside_a_post_resumes_without_posting_twice(world, tmp_path, crash,
                                                                    monkeypatch):
    """The two windows of a post: killed after its transaction was recorded but before it was
    sent (it never lands: its nonce is filled, the prompt posted again), or after it was sent
    but before its request id was recorded (it landed: it is followed, not posted again).
    Either way each prompt is posted exactly once and every answer is in the dataset."""
    from optinfer.contracts.sender import TxSender

    out = tmp_path / "dataset"
    prompts = read_prompts(prompts_file(tmp_path, 3, seed=crash == "before_send"), world.model)
    before = world.coordinator.parameter("requestCount")

    class Killed(BaseException):
        pass

    def die(*_args, **_kwargs):
        raise Killed

    target = "_broadcast" if crash == "before_send" else "wait"
    monkeypatch.setattr(TxSender, target, die)
    builder = builder_for(world, prompts, out, concurrency=1)
    with pytest.raises(Killed):
        builder.step()
    builder.close()
    monkeypatch.undo()
    posted = world.coordinator.parameter("requestCount") - before
    assert posted == (0 if crash == "before_send" else 1)

    resumed = builder_for(world, prompts, out, concurrency=1)
    assert resumed.resumed
    summary = finish(world, resumed)
    resumed.close()
    assert summary["records"] == 3 and summary["complete"]
    ids = [row["request_id"] for row in read_rows(out)]
    assert sorted(ids) == list(range(before + 1, before + 4))  # three posts, no more


def test_a_resumed_build_must_repeat_its_options_and_prompts(world, tmp_path):
    out = tmp_path / "dataset"
    prompts = read_prompts(prompts_file(tmp_path, 2, seed=5), world.model)
    builder_for(world, prompts, out).close()
    from optinfer.errors import UserError

    with pytest.raises(UserError, match="with other options"):
        builder_for(world, prompts, out, commit_seconds=900)
    with pytest.raises(UserError, match="other prompts"):
        builder_for(world, prompts[:1], out)


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompt"),
    ("hello\n", "line 1: the model.s tokenizer cannot encode"),
    ('{"prompt": "1+2="}\n{"prompt": "3+4=", "id": "0"}\n', "line 2: the id '0' is used twice"),
    ('{"messages": [{"role": "user", "content": "1+2="}]}\n', "has no chat template"),
    ('{"text": "1+2="}\n', 'give an object with "prompt" or "messages"'),
])
def test_bad_prompt_files_are_refused_naming_the_line(world, tmp_path, content, message):
    from optinfer.errors import UserError

    path = tmp_path / ("prompts.jsonl" if content.startswith("{") else "prompts.txt")
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_prompts(path, world.model)


def finalized_in(journal: Path) -> int:
    """Records in a build's journal, read as another process would (0 before it exists)."""
    import sqlite3

    if not journal.exists():
        return 0
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    except sqlite3.OperationalError:  # its tables are not created yet
        return 0
    finally:
        db.close()


def test_build_killed_with_sigkill_resumes_and_posts_nothing_twice(world, tmp_path):
    """`optinfer dataset build` as a user runs it, with the honest provider and the
    watchtower at work beside it: killed with SIGKILL once answers are finalizing and more
    are in flight, then run again with the same command. Every prompt was posted exactly once
    (none was answered falsely), and the dataset holds every answer."""
    import signal
    import threading
    import time

    from optinfer.services.dataset_build import JOURNAL_FILE
    from optinfer.services.demo import CHALLENGE_WINDOW

    out = tmp_path / "dataset"
    prompts = prompts_file(tmp_path, 12, seed=21)
    env = {**os.environ, "OPTINFER_RPC_URL": world.chain.url,
           "OPTINFER_DEPLOYMENTS": str(world.workdir / "deployments.json"),
           "OPTINFER_STATE_DIR": str(tmp_path / "state"), "OPTINFER_POLL_INTERVAL": "0.1"}
    command = [OPTINFER, "dataset", "build", "--prompts", str(prompts), "--out", str(out),
               "--max-tokens", str(MAX_TOKENS), "--fee", str(FEE), "--concurrency", "3",
               "--json"]
    first_request = world.coordinator.parameter("requestCount") + 1
    stop = threading.Event()

    def serve() -> None:  # the provider and the watchtower, and time passing
        while not stop.is_set():
            world.honest.poll_once()
            world.scan.delay()
            open_ids = range(first_request, world.coordinator.parameter("requestCount") + 1)
            statuses = [world.coordinator.get_request(i).status for i in open_ids]
            if Status.COMMITTED in statuses and Status.OPEN not in statuses:
                world.advance(CHALLENGE_WINDOW)
            time.sleep(0.05)

    actors = threading.Thread(target=serve, daemon=True)
    actors.start()
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        journal = out / JOURNAL_FILE
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if finalized_in(journal) >= 3:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        actors.join()
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["resumed"] and summary["records"] == 12 and summary["complete"]
    posted = world.coordinator.parameter("requestCount") - first_request + 1
    assert posted == 12  # each prompt once
    rows = read_rows(out)
    assert sorted(row["request_id"] for row in rows) == list(
        range(first_request, first_request + 12))


def test_export_writes_what_a_node_saw_finalized_and_it_verifies(world, tmp_path):
    """`optinfer dataset export` from the honest provider's database: the finalized requests
    of its model, each read back from the chain; `dataset verify` passes on them."""
    prompts = read_prompts(prompts_file(tmp_path, 2, seed=31), world.model)
    builder = builder_for(world, prompts, tmp_path / "built")
    finish(world, builder)
    builder.close()
    world.honest.poll_once()  # its cursor sees the finalizations
    env = {**os.environ, "OPTINFER_RPC_URL": world.chain.url,
           "OPTINFER_DEPLOYMENTS": str(world.workdir / "deployments.json"),
           "OPTINFER_STATE_DIR": str(tmp_path / "state"),
           "OPTINFER_DATABASE_URL": f"sqlite:///{world.workdir / 'provider.db'}"}
    out = tmp_path / "exported"
    done = subprocess.run([OPTINFER, "dataset", "export", "--out", str(out), "--format",
                           "jsonl", "--json"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    rows = read_rows(out)
    assert summary["records"] == len(rows) >= 2
    assert all(row["id"] == str(row["request_id"]) for row in rows)
    built = {row["request_id"]: row for row in read_rows(tmp_path / "built")}
    for row in rows:
        if row["request_id"] in built:
            assert row["answer_tokens"] == built[row["request_id"]]["answer_tokens"]
    checked = subprocess.run([OPTINFER, "dataset", "verify", str(out), "--recompute"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "all verified against the chain and recomputed" in checked.stdout


def test_a_build_stopped_by_its_timeout_writes_what_it_has_and_exits_1(world, tmp_path):
    """Nobody serves (the actors are idle here): `--timeout` ends the build with its requests
    open, the files written with no record, and exit status 1, saying how to go on."""
    env = {**os.environ, "OPTINFER_RPC_URL": world.chain.url,
           "OPTINFER_DEPLOYMENTS": str(world.workdir / "deployments.json"),
           "OPTINFER_STATE_DIR": str(tmp_path / "state"), "OPTINFER_POLL_INTERVAL": "0.1"}
    out = tmp_path / "dataset"
    done = subprocess.run([OPTINFER, "dataset", "build", "--prompts",
                           str(prompts_file(tmp_path, 2, seed=41)), "--out", str(out),
                           "--timeout", "1", "--fee", str(FEE)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "0 of 2 prompts" in done.stdout and "run the same command again" in done.stdout
    assert read_rows(out) == [] and (out / CARD_FILE).is_file()
