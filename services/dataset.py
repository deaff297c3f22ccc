"""Verified datasets (issue 23): finalized answers written with their provenance, and checked
against the chain by anyone (docs/datasets.md).

A record says: on this chain, through this coordinator, request `request_id` asked the model
registered as `model_id` (whose graph's commitment is `model_root`) for `prompt_tokens`,
decoded as `temperature` / `top_p` / `seed` say, and the answer `answer_tokens` that
`provider` committed in `commit_tx` was finalized in `finalize_tx`: its challenge window
passed and no dispute convicted it. :func:`provenance` reads all of that back from the chain
for one request; the builder (`dataset_build.py`) and `export` make records from it, and
:func:`check_record` compares a record with it field by field, then the texts with the model's
tokenizer and, with `recompute`, the tokens with the integer model itself.

Files: ``data.parquet`` (and ``data.jsonl`` on request), one row per record in the order of
:data:`COLUMNS`, and ``README.md``, the dataset card, whose YAML header points the Hugging
Face ``datasets`` library at the Parquet file (``load_dataset("parquet", data_files=...)``
loads it as is).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from web3 import Web3

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import InferenceCoordinator, Status, token_hash
from optinfer.contracts.registry import ModelRegistry
from optinfer.errors import UserError
from optinfer.models.sampling import Sampling

PARQUET_FILE = "data.parquet"
JSONL_FILE = "data.jsonl"
CARD_FILE = "README.md"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FORMATS = ("parquet", "jsonl")


@dataclass(frozen=True)
class Provenance:
    """What the chain says about one request and its claim (hex strings for bytes)."""

    chain_id: int
    coordinator: str
    request_id: int
    status: str  # the coordinator's Status, lower case
    model_id: str
    model_root: str
    consumer: str
    provider: str
    max_tokens: int
    temperature: int
    top_p: int
    seed: int
    prompt_hash: str
    answer_tokens: list[int]
    commit_tx: str | None
    commit_block: int | None
    finalize_tx: str | None
    finalize_block: int | None


@dataclass(frozen=True)
class Record:
    """One dataset row: the prompt and answer, as text and token ids, and their provenance.
    `messages` is the conversation for a chat prompt (then `prompt` is its last user
    message); `reasoning` is the text inside ``<think>...</think>`` (None without one) and
    `final_answer` what follows it."""

    id: str
    prompt: str
    messages: list[dict[str, str]] | None
    prompt_tokens: list[int]
    answer: str
    answer_tokens: list[int]
    reasoning: str | None
    final_answer: str
    model_id: str
    model_root: str
    chain_id: int
    coordinator: str
    request_id: int
    consumer: str
    provider: str
    max_tokens: int
    temperature: int
    top_p: int
    seed: int
    commit_tx: str
    commit_block: int
    finalize_tx: str
    finalize_block: int

    def row(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(Record))
#: The provenance fields a record carries, compared with the chain's by `check_record`.
CHAIN_FIELDS = ("chain_id", "coordinator", "request_id", "model_id", "model_root", "consumer",
                "provider", "max_tokens", "temperature", "top_p", "seed", "answer_tokens",
                "commit_tx", "commit_block", "finalize_tx", "finalize_block")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, final answer) of an answer: the text before ``</think>`` (without a leading
    ``<think>``: an R1 chat template opens it in the prompt) and the text after it; (None, the
    whole text) when there is no ``</think>``."""
    if THINK_CLOSE not in text:
        return None, text.strip()
    reasoning, final = text.split(THINK_CLOSE, 1)
    reasoning = reasoning.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):].strip()
    return reasoning, final.strip()


# ------------------------------------------------------------------------------ the chain


@dataclass(frozen=True)
class ChainView:
    """The contracts a dataset's records are checked against."""

    w3: Web3
    coordinator: InferenceCoordinator
    registry: ModelRegistry
    from_block: int  # the deployment's block: no event of theirs is older

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    @classmethod
    def of(cls, w3: Web3, deployments) -> ChainView:
        return cls(w3, InferenceCoordinator(w3, deployments.address("InferenceCoordinator")),
                   ModelRegistry(w3, deployments.address("ModelRegistry")),
                   deployments.block_number)


def provenance(view: ChainView, request_id: int) -> Provenance:
    """Request `request_id` as the chain tells it now. UserError for an unknown id."""
    coordinator = view.coordinator
    try:
        request = coordinator.get_request(request_id)
    except ContractRevert as err:
        raise UserError(f"request {request_id} does not exist on coordinator "
                        f"{coordinator.address} ({err.name})") from None
    committed = _event(view, "OutputCommitted", request_id)
    finalized = _event(view, "Finalized", request_id)
    output = coordinator.get_output(request_id) if committed is not None else []
    return Provenance(
        chain_id=view.chain_id, coordinator=coordinator.address, request_id=request_id,
        status=request.status.name.lower(), model_id="0x" + request.model_id.hex(),
        model_root="0x" + view.registry.get_model(request.model_id).spec.model_root.hex(),
        consumer=request.consumer, provider=request.provider, max_tokens=request.max_tokens,
        temperature=request.temperature, top_p=request.top_p, seed=request.seed,
        prompt_hash="0x" + request.prompt_hash.hex(), answer_tokens=list(output),
        commit_tx=committed and committed[0], commit_block=committed and committed[1],
        finalize_tx=finalized and finalized[0], finalize_block=finalized and finalized[1])


def _event(view: ChainView, name: str, request_id: int) -> tuple[str, int] | None:
    """(transaction, block) of the coordinator's `name` event for `request_id`, if any."""
    logs = getattr(view.coordinator.contract.events, name).get_logs(
        argument_filters={"requestId": request_id}, from_block=view.from_block)
    if not logs:
        return None
    last = logs[-1]
    return "0x" + bytes(last["transactionHash"]).hex(), int(last["blockNumber"])


def make_record(record_id: str, chain: Provenance, model, prompt_tokens: Sequence[int],
                prompt: str | None = None, messages: list[dict[str, str]] | None = None
                ) -> Record:
    """The record of a finalized request: its texts from `model`'s tokenizer (the prompt's
    as given, else decoded from its ids)."""
    if chain.status != Status.FINALIZED.name.lower():
        raise ValueError(f"request {chain.request_id} is {chain.status}, not finalized")
    answer = model.decode_text(chain.answer_tokens)
    reasoning, final = split_reasoning(answer)
    if prompt is None:
        prompt = messages[-1]["content"] if messages else model.decode_text(list(prompt_tokens))
    values = {name: getattr(chain, name) for name in CHAIN_FIELDS}
    return Record(id=str(record_id), prompt=prompt, messages=messages,
                  prompt_tokens=list(prompt_tokens), answer=answer, reasoning=reasoning,
                  final_answer=final, **values)


# ---------------------------------------------------------------------------- checking


def check_record(row: dict[str, Any], view: ChainView, model=None,
                 recompute: bool = False) -> str | None:
    """Why `row` (a dataset row) is not what the chain finalized, or None when it is.

    Against the chain: the request exists on this chain and coordinator, is finalized (not
    rejected, refunded or still open), hashes to the record's prompt ids, holds exactly its
    answer ids, and every provenance field is the chain's (the model root is the registered
    one of the model id). With `model` (whose id must be the record's): the texts are those
    of the ids. With `recompute`: `model` answers the prompt with exactly these tokens,
    teacher-forced in one pass, as the request's draw decodes them.
    """
    missing = [name for name in COLUMNS if name not in row]
    if missing:
        return f"the record lacks {', '.join(missing)}"
    if row["chain_id"] != view.chain_id:
        return f"it was made on chain {row['chain_id']}, the RPC node is on chain {view.chain_id}"
    if str(row["coordinator"]).lower() != view.coordinator.address.lower():
        return (f"it names coordinator {row['coordinator']}, not the deployment's "
                f"{view.coordinator.address}")
    try:
        chain = provenance(view, int(row["request_id"]))
    except UserError as err:
        return str(err)
    if chain.status != "finalized":
        return f"request {chain.request_id} is {chain.status} on chain, not finalized"
    if "0x" + token_hash(list(row["prompt_tokens"])).hex() != chain.prompt_hash:
        return f"its prompt tokens are not request {chain.request_id}'s (the prompt hash differs)"
    for name in CHAIN_FIELDS:
        ours, theirs = _plain(row[name]), _plain(getattr(chain, name))
        if ours != theirs:
            return f"{name} is {_short(ours)}, the chain's is {_short(theirs)}"
    if model is None:
        return None
    return _check_texts(row, model, chain, recompute)


def _check_texts(row: dict[str, Any], model, chain: Provenance, recompute: bool) -> str | None:
    from optinfer.models.chat import chat_tokens

    answer = model.decode_text(list(row["answer_tokens"]))
    if row["answer"] != answer:
        return "its answer text is not the text of its answer tokens"
    if (row["reasoning"], row["final_answer"]) != split_reasoning(answer):
        return "its reasoning and final answer are not its answer's, split at </think>"
    messages, tokens = row["messages"], list(row["prompt_tokens"])
    if messages:
        if chat_tokens(model, messages) != tokens:
            return "its messages, in the model's chat template, do not give its prompt tokens"
    elif model.encode(row["prompt"]) != tokens and model.decode_text(tokens) != row["prompt"]:
        # A built record's text is what was asked (it encodes to the ids); an exported one's
        # is what the ids decode to (the node kept no text).
        return "its prompt text is neither what gives its prompt tokens nor what they give"
    if recompute:
        draw = Sampling.from_chain(chain.temperature, chain.top_p, chain.seed)
        check = model.verify(list(row["prompt_tokens"]), list(row["answer_tokens"]),
                             chain.max_tokens, draw=draw)
        if not check.valid:
            return f"the model does not answer so: {check.reason}"
    return None


def _plain(value: Any) -> Any:
    """A row's value as compared: lists of ints, addresses and hashes lower case."""
    if isinstance(value, str):
        return value.lower()
    if value is not None and not isinstance(value, int | str) and hasattr(value, "__iter__"):
        return [int(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------- files


def _schema():
    import pyarrow as pa

    ints = pa.list_(pa.int64())
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    types = {"prompt_tokens": ints, "answer_tokens": ints, "messages": pa.list_(message),
             "chain_id": pa.int64(), "request_id": pa.int64(), "max_tokens": pa.int64(),
             "temperature": pa.int64(), "top_p": pa.int64(), "seed": pa.int64(),
             "commit_block": pa.int64(), "finalize_block": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])


def pyarrow_module():
    """pyarrow, or UserError with the install command (the `dataset` extra)."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("datasets are written as Parquet with pyarrow, which is not installed: "
                        "pip install 'optinfer[dataset]'") from None
    return pq


def write_dataset(out_dir: Path, records: Iterable[Record], formats: Sequence[str],
                  card: dict[str, Any]) -> list[Path]:
    """Write `records` (sorted by id) as each of `formats` and the dataset card; the paths.
    Each file is written beside its place and moved in whole: a crash leaves the old one."""
    import pyarrow as pa

    pq = pyarrow_module()
    rows = [record.row() for record in sorted(records, key=_record_order)]
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if "parquet" in formats:
        table = pa.Table.from_pylist(rows, schema=_schema())
        written.append(_replace(out_dir / PARQUET_FILE, lambda tmp: pq.write_table(table, tmp)))
    if "jsonl" in formats:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        written.append(_replace(out_dir / JSONL_FILE,
                                lambda tmp: tmp.write_text(text, encoding="utf-8")))
    card_text = dataset_card({**card, "records": len(rows)}, formats)
    written.append(_replace(out_dir / CARD_FILE,
                            lambda tmp: tmp.write_text(card_text, encoding="utf-8")))
    return written


def _record_order(record: Record) -> tuple:
    return (0, int(record.id), "") if record.id.isdigit() else (1, 0, record.id)


def _replace(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
    return path


def read_rows(directory: Path) -> list[dict[str, Any]]:
    """The rows of the dataset in `directory`: its Parquet file, else its JSONL file."""
    parquet, jsonl = directory / PARQUET_FILE, directory / JSONL_FILE
    if parquet.is_file():
        pq = pyarrow_module()
        try:
            return pq.read_table(parquet).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow's errors are many; all are the file's
            raise UserError(f"{parquet} is not a readable Parquet file: {err}") from None
    if jsonl.is_file():
        rows = []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise UserError(f"{jsonl} line {number} is not JSON: {err}") from None
        return rows
    raise UserError(f"{directory} holds no dataset ({PARQUET_FILE} or {JSONL_FILE})")


def dataset_card(info: dict[str, Any], formats: Sequence[str]) -> str:
    """README.md of a dataset folder: how it was made and how to check it. `info` holds the
    model, chain and coordinator, the record count and, from a build, its figures."""
    files = [name for name, wanted in ((PARQUET_FILE, "parquet"), (JSONL_FILE, "jsonl"))
             if wanted in formats]
    made = [f"- {label}: {info[key]}" for key, label in (
        ("prompts", "prompts"), ("fees_paid_wei", "fees paid (wei)"),
        ("slashed_and_reposted", "answers slashed and their prompts posted again"),
        ("refunded_and_reposted", "requests refunded unanswered and posted again"))
        if key in info]
    return "\n".join([
        "---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
        f"    path: {files[0]}", "---", "",
        f"# {info.get('name', 'A verified dataset')}", "",
        f"{info['records']} answers of model `{info['model_id']}` (model root "
        f"`{info['model_root']}`), each asked as a request of the optinfer coordinator "
        f"`{info['coordinator']}` on chain {info['chain_id']}, committed by a staked provider "
        "and finalized: its challenge window passed and no dispute convicted it. Made by "
        f"`optinfer {info.get('command', 'dataset build')}` on "
        f"{info.get('date') or datetime.now(UTC).date().isoformat()}.", "",
        *(["## How it was made", "", *made, ""] if made else []),
        "## What a record proves", "",
        "The model registered under `model_id`, given exactly `prompt_tokens` and decoded as "
        "`temperature` / `top_p` / `seed` say (temperature 0: greedy), produced exactly "
        "`answer_tokens`; a provider staked on it in `commit_tx` and nobody proved otherwise "
        "before `finalize_tx`. It does not prove that the prompt is a good one, nor that the "
        "answer is right: only that it is the model's.", "",
        "## How to check it", "",
        "    optinfer dataset verify DIR              # every record against the chain",
        "    optinfer dataset verify DIR --recompute  # and each answer with the integer model",
        "",
        "Columns: " + ", ".join(f"`{name}`" for name in COLUMNS) + ".", ""])
