"""Downloading a model from a node's HTTP API and proving it is the registered one.

A watchtower must re-execute exactly the model a claim names, and it trusts nothing the
serving node says. :func:`fetch_model` ties every byte it keeps to the chain:

1. the registry holds the SHA-256 of the manifest file registered under the id, so the
   manifest downloaded must hash to it, and the manifest's own fields (roots, op set, node
   count, max context, EOS ids, with its hash) must give the id (``ModelSpec.model_id``);
2. the manifest lists the SHA-256 of every model file, so each file downloaded must hash to
   its entry;
3. independently, the model root is recomputed from the verify graph and its constants
   (``models.manifest.model_commitment``) and must be the registered one.

Only then is the directory moved into place; a refused download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.errors import UserError

MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20


class ModelRejected(UserError):
    """What the node served is not the model registered under the id asked for."""


def normalize_model_id(model_id: str | bytes) -> str:
    """`model_id` as 0x + 64 lower-case hex digits; UserError for anything else."""
    if isinstance(model_id, bytes):
        digits = model_id.hex()
    else:
        digits = model_id.strip().lower().removeprefix("0x")
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise UserError(f"a model id is 0x + 64 hex digits, got {model_id!r}")
    return "0x" + digits


def fetch_model(base_url: str, model_id: str | bytes, dest: Path, registry: ModelRegistry, *,
                client: httpx.Client | None = None, timeout: float = 60.0,
                progress: Callable[[float, str], None] | None = None) -> Path:
    """Download model `model_id` from the API at `base_url` into the new directory `dest`,
    check it against `registry` (see the module docstring) and return `dest`.

    ModelRejected when anything does not match, UserError when the node cannot be reached or
    answers an error. `client` replaces the HTTP client (a test's in-process app, say).
    `progress(fraction, file name)` follows the download, file by file.
    """
    model_id = normalize_model_id(model_id)
    dest = Path(dest)
    if dest.exists():
        raise UserError(f"{dest} already exists: fetch_model writes a new directory")
    owned = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=True)
    base = base_url.rstrip("/") + f"/v1/models/{model_id}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        raw = _get(http, base)
        manifest, registered = _registered_manifest(raw, model_id, registry)
        (staging / MANIFEST).write_bytes(raw)
        files = list(manifest["files"].items())
        for done, (name, digest) in enumerate(files):
            def file_progress(fraction: float, name: str = name, done: int = done) -> None:
                if progress is not None:
                    progress((done + fraction) / len(files), name)

            _download(http, f"{base}/files/{name}", staging / name, digest, file_progress)
        if progress is not None:
            progress(1.0, "checking the model root")
        _check_model_root(staging, manifest, model_id, registered.model_root)
        os.replace(staging, dest)
        return dest
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if owned:
            http.close()


def _registered_manifest(raw: bytes, model_id: str,
                         registry: ModelRegistry) -> tuple[dict, ModelSpec]:
    """The manifest in `raw`, after checking it is the one registered under `model_id`, and
    the registration."""
    try:
        registered = registry.get_model(bytes.fromhex(model_id[2:]))
    except ContractRevert as err:
        if err.name == "ModelNotRegistered":
            raise ModelRejected(f"model {model_id} is not registered on chain") from None
        raise
    digest = hashlib.sha256(raw).digest()
    if digest != registered.spec.manifest_hash:
        raise ModelRejected(
            f"the manifest served for {model_id} hashes to 0x{digest.hex()}, but the registry "
            f"holds 0x{registered.spec.manifest_hash.hex()}")
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        needed = {manifest["graphs"]["verify"], manifest["constants_file"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ModelRejected(f"the registered manifest of {model_id} is malformed: {err}") from None
    if not isinstance(files, dict) or not needed <= set(files):
        raise ModelRejected(f"the manifest of {model_id} does not list {sorted(needed)}")
    _check_manifest_gives_id(raw, model_id)
    for name in files:
        # Names come from the node: a path would write outside the directory.
        plain = isinstance(name, str) and Path(name).name == name
        if not plain or name in ("", ".", "..", MANIFEST):
            raise ModelRejected(f"the manifest lists a file named {name!r}")
    return manifest, registered.spec


def _check_manifest_gives_id(raw: bytes, model_id: str) -> None:
    """The manifest's own fields must give `model_id`. The registry computed the id from the
    registered fields, so they are then the manifest's: its roots, node count, and the max
    context and EOS ids the coordinator judges requests and answer endings by (the URI is no
    part of the id)."""
    try:
        served = ModelSpec.from_manifest_bytes(raw, "",
                                               what=f"the registered manifest of {model_id}")
    except UserError as err:
        raise ModelRejected(str(err)) from None
    if "0x" + served.model_id.hex() != model_id:
        raise ModelRejected(
            f"the registered manifest of {model_id} gives model id 0x{served.model_id.hex()} "
            f"(max context {served.max_context}, EOS ids {list(served.eos_token_ids)}, model "
            f"root 0x{served.model_root.hex()}): it is not the manifest of that model")


def _get(http: httpx.Client, url: str) -> bytes:
    try:
        response = http.get(url)
    except httpx.HTTPError as err:
        raise UserError(f"GET {url}: {type(err).__name__}: {err}") from None
    if response.status_code != 200:
        raise UserError(f"GET {url}: HTTP {response.status_code} {_detail(response)}")
    return response.content


def _download(http: httpx.Client, url: str, path: Path, sha256_hex: str,
              progress: Callable[[float], None]) -> None:
    """Stream `url` into `path`, refusing it unless it hashes to `sha256_hex`."""
    digest = hashlib.sha256()
    try:
        with http.stream("GET", url) as response:
            if response.status_code != 200:
                response.read()
                raise UserError(f"GET {url}: HTTP {response.status_code} {_detail(response)}")
            size = int(response.headers.get("content-length") or 0)
            received = 0
            with path.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    progress(min(received / size, 1.0) if size else 0.0)
    except httpx.HTTPError as err:
        raise UserError(f"GET {url}: {type(err).__name__}: {err}") from None
    if digest.hexdigest() != str(sha256_hex).lower():
        raise ModelRejected(f"{path.name} hashes to {digest.hexdigest()}, but the registered "
                            f"manifest lists {sha256_hex}")


def _check_model_root(directory: Path, manifest: dict, model_id: str, expected: bytes) -> None:
    """Recompute the model root from the verify graph and its constants file: it must be
    `expected`, the registered one."""
    import onnx
    from onnx import numpy_helper

    from optinfer.models.manifest import model_commitment

    try:
        graph = onnx.load(str(directory / manifest["graphs"]["verify"]))
        constants = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
        root = model_commitment(graph, constants)["model_root"]
    except Exception as err:  # a malformed graph is the node's fault, whatever onnx raises
        raise ModelRejected(f"the verify graph of {model_id} cannot be loaded: {err}") from None
    if root != expected:
        raise ModelRejected(f"the model files of {model_id} recompute to root 0x{root.hex()}, "
                            f"not the registered 0x{expected.hex()}")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))
    except (ValueError, AttributeError):
        return response.text[:200]
