"""Find a Solidity compiler and compile Standard JSON input through py-solc-x.

No compiler can be downloaded here (py-solc-x's installer needs the internet), so `solc` is
resolved, in order, as:

1. the path in the ``OPTINFER_SOLC`` environment variable;
2. a native ``solc`` on ``PATH``, if it is the pinned version;
3. the solc-js shim: ``contracts/toolchain/solc-shim.js`` copied into the project's tools folder
   (``.tools/bin/solc``), where it runs the npm package ``solc`` that ``make install`` put there.

Every candidate must report exactly :data:`SOLC_VERSION`: the committed artifacts are compared
byte for byte with a fresh build, and another compiler version emits other bytecode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import solcx
from solcx.exceptions import SolcError

from optinfer.errors import UserError

# Pinned compiler and settings. Changing any of them changes every artifact: rebuild and commit.
SOLC_VERSION = "0.8.37"
EVM_VERSION = "cancun"
OPTIMIZER_RUNS = 200

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIM_SOURCE = Path(__file__).resolve().parent / "toolchain" / "solc-shim.js"

_VERSION_RE = re.compile(r"Version:\s*(\d+\.\d+\.\d+)")


def tools_dir() -> Path:
    """The project-local folder of Node tools: ``OPTINFER_TOOLS_DIR`` or ``<repo>/.tools``."""
    return Path(os.environ.get("OPTINFER_TOOLS_DIR", REPO_ROOT / ".tools"))


def compiler_settings() -> dict[str, Any]:
    """The Standard JSON ``settings`` every contract is compiled with (without outputSelection)."""
    return {
        "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
        "evmVersion": EVM_VERSION,
        # No metadata hash in the bytecode: a comment or an unrelated edit to a shared import
        # (Errors.sol) then leaves a contract's committed artifact unchanged.
        "metadata": {"bytecodeHash": "none"},
    }


def _reported_version(binary: Path) -> str | None:
    """The X.Y.Z that ``binary --version`` prints, or None when it does not run or says nothing."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except OSError:
        return None
    match = _VERSION_RE.search(out)
    return match.group(1) if match else None


def ensure_solcjs_shim() -> Path | None:
    """Write the solc-js shim into the tools folder; None when solc-js is not installed there.

    The shim is (re)written whenever its bytes differ from the committed
    ``contracts/toolchain/solc-shim.js``, so an edit to the shim reaches every checkout.
    It lives under the tools folder so that Node resolves ``require("solc")`` from
    ``<tools>/node_modules``.
    """
    tools = tools_dir()
    if not (tools / "node_modules" / "solc" / "package.json").is_file():
        return None
    shim = tools / "bin" / "solc"
    source = SHIM_SOURCE.read_bytes()
    if not shim.is_file() or shim.read_bytes() != source:
        shim.parent.mkdir(parents=True, exist_ok=True)
        tmp = shim.with_name(f"solc.{os.getpid()}.tmp")  # per process: test workers race here
        tmp.write_bytes(source)
        tmp.chmod(0o755)
        tmp.replace(shim)  # atomic: a concurrent test worker never sees half a file
    return shim


@lru_cache(maxsize=1)
def find_solc() -> Path:
    """The `solc` binary to compile with (see the module docstring for the order).

    Raises UserError when ``OPTINFER_SOLC`` names a missing file or another version, or when no
    candidate of version :data:`SOLC_VERSION` exists.
    """
    configured = os.environ.get("OPTINFER_SOLC")
    if configured:
        path = Path(configured)
        version = _reported_version(path)
        if version is None:
            raise UserError(f"OPTINFER_SOLC={configured} is not a working solc binary")
        if version != SOLC_VERSION:
            raise UserError(
                f"OPTINFER_SOLC={configured} is solc {version}; the project pins {SOLC_VERSION} "
                "(the committed artifacts are built with it)"
            )
        return path

    rejected: list[str] = []
    native = shutil.which("solc")
    if native:
        version = _reported_version(Path(native))
        if version == SOLC_VERSION:
            return Path(native)
        rejected.append(f"{native} is solc {version}")

    shim = ensure_solcjs_shim()
    if shim is not None:
        version = _reported_version(shim)
        if version == SOLC_VERSION:
            return shim
        rejected.append(f"{shim} (solc-js) is solc {version}")

    detail = f" (found, but not {SOLC_VERSION}: {'; '.join(rejected)})" if rejected else ""
    raise UserError(
        f"no Solidity compiler {SOLC_VERSION} found{detail}. Run `make install` (it installs "
        f"solc-js into {tools_dir()}) or set OPTINFER_SOLC to a native solc {SOLC_VERSION}."
    )


def compile_standard_json(sources: dict[str, str]) -> dict[str, Any]:
    """Compile Solidity sources (unit name -> source text) with the pinned settings.

    Returns the compiler's Standard JSON output. Every import must name a unit in `sources`
    (they are all given to the compiler; nothing is read from disk). Raises UserError with the
    compiler's messages when the sources do not compile.
    """
    standard_input = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sorted(sources.items())},
        "settings": {
            **compiler_settings(),
            "outputSelection": {
                "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object",
                            "metadata"]}
            },
        },
    }
    try:
        return solcx.compile_standard(standard_input, solc_binary=find_solc())
    except SolcError as err:
        raise UserError(f"Solidity compilation failed:\n{err.message}") from err
