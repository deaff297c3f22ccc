"""Compile ``contracts/src/**/*.sol`` into the committed artifacts in ``contracts/artifacts/``.

One JSON file per contract, ``<ContractName>.json``::

    {"contractName", "sourceName", "abi", "bytecode", "deployedBytecode",
     "compiler": {"version"}, "settings": {"optimizer", "evmVersion"}}

Bytes are deterministic (sorted keys, fixed indentation, no timestamps, unit names relative to
``contracts/``), so a rebuild of unchanged sources reproduces the committed files exactly and a
test can detect stale artifacts by comparing bytes.

Run as ``python -m optinfer.contracts.build``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from optinfer.contracts.compiler import compile_standard_json, compiler_settings
from optinfer.errors import UserError

CONTRACTS_DIR = Path(__file__).resolve().parent
SOURCES_DIR = CONTRACTS_DIR / "src"
ARTIFACTS_DIR = CONTRACTS_DIR / "artifacts"

BUILD_COMMAND = "python -m optinfer.contracts.build"


def read_sources(sources_dir: Path = SOURCES_DIR) -> dict[str, str]:
    """Every ``.sol`` file under `sources_dir`, keyed by its unit name ``src/<relative path>``.

    Unit names are relative (never absolute paths) because they are hashed into each
    contract's metadata and so into its bytecode.
    """
    files = sorted(sources_dir.rglob("*.sol"))
    if not files:
        raise UserError(f"no Solidity sources under {sources_dir}")
    return {
        f"src/{path.relative_to(sources_dir).as_posix()}": path.read_text(encoding="utf-8")
        for path in files
    }


def artifact_bytes(artifact: dict[str, Any]) -> bytes:
    """The canonical file bytes of one artifact: sorted keys, 1-space indent, final newline."""
    return (json.dumps(artifact, sort_keys=True, indent=1) + "\n").encode("utf-8")


def compile_artifacts(sources_dir: Path = SOURCES_DIR) -> dict[str, dict[str, Any]]:
    """Compile the sources and return contract name -> artifact (not written anywhere).

    Units that declare no contract (Errors.sol) produce no artifact. Two contracts with the
    same name in different files are refused: artifacts are keyed by name.
    """
    output = compile_standard_json(read_sources(sources_dir))
    artifacts: dict[str, dict[str, Any]] = {}
    for source_name, contracts in sorted(output.get("contracts", {}).items()):
        for name, compiled in sorted(contracts.items()):
            if name in artifacts:
                raise UserError(
                    f"contract name {name} is declared in both "
                    f"{artifacts[name]['sourceName']} and {source_name}"
                )
            metadata = json.loads(compiled["metadata"])
            artifacts[name] = {
                "contractName": name,
                "sourceName": source_name,
                "abi": compiled["abi"],
                "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
                # The metadata's version has no platform suffix: native solc and solc-js agree.
                "compiler": {"version": metadata["compiler"]["version"]},
                "settings": compiler_settings(),
            }
    return artifacts


def build(out_dir: Path = ARTIFACTS_DIR, sources_dir: Path = SOURCES_DIR) -> dict[str, Path]:
    """Compile every contract and write its artifact to `out_dir`; return name -> file path.

    Files are only rewritten when their bytes change. Any other ``*.json`` in `out_dir` (the
    artifact of a contract that no longer exists) is deleted, so `out_dir` holds exactly the
    current contracts.
    """
    artifacts = compile_artifacts(sources_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, artifact in artifacts.items():
        path = out_dir / f"{name}.json"
        data = artifact_bytes(artifact)
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        written[name] = path
    for stale in out_dir.glob("*.json"):
        if stale not in written.values():
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: build into the committed artifacts folder and list what was written."""
    del argv  # no options yet
    try:
        written = build()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
