"""Compiler resolution, the solc-js shim, and freshness of the committed artifacts."""

from __future__ import annotations

import pytest
from packaging.version import Version
from solcx.wrapper import get_solc_version

from optinfer.contracts import compiler
from optinfer.contracts.artifacts import ARTIFACTS_DIR, artifact_names, load_artifact
from optinfer.contracts.build import BUILD_COMMAND, build
from optinfer.errors import UserError


@pytest.fixture
def fresh_resolution():
    """Forget the cached compiler before and after a test that changes the environment."""
    compiler.find_solc.cache_clear()
    yield
    compiler.find_solc.cache_clear()


def test_build_committedArtifacts_matchAFreshBuild(tmp_path):
    built = build(out_dir=tmp_path)
    assert sorted(built) == artifact_names(), f"artifacts out of date: run `{BUILD_COMMAND}`"
    for path in built.values():
        committed = ARTIFACTS_DIR / path.name
        assert path.read_bytes() == committed.read_bytes(), (
            f"contracts/artifacts/{path.name} is stale: run `{BUILD_COMMAND}` and commit it"
        )
    assert "ModelRegistry" in built


def test_artifact_pinnedCompilerAndSettings_recorded():
    artifact = load_artifact("ModelRegistry")
    assert artifact.compiler_version.startswith(compiler.SOLC_VERSION + "+commit.")
    assert artifact.bytecode.startswith("0x60") and len(artifact.deployed_bytecode) > 100
    assert {entry["name"] for entry in artifact.abi if entry["type"] == "error"} == {
        "ModelAlreadyRegistered", "ModelNotRegistered",
        "ZeroNodeCount", "ZeroMaxContext", "TooManyEosTokenIds", "UnsupportedOpsetVersion",
        "NodeCountBeyondStateTree", "MaxContextBeyondDisputeBound",
    }


def test_findSolc_reportsPinnedVersion_inNativeFormat():
    # py-solc-x parses `solc --version` itself: the shim (or a native solc) must satisfy it.
    binary = compiler.find_solc()
    assert get_solc_version(binary) == Version(compiler.SOLC_VERSION)


def test_findSolc_noCompilerAnywhere_raisesUserError(tmp_path, monkeypatch, fresh_resolution):
    monkeypatch.delenv("OPTINFER_SOLC", raising=False)
    monkeypatch.setenv("OPTINFER_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="make install.*OPTINFER_SOLC"):
        compiler.find_solc()


def test_findSolc_configuredPathNotSolc_raisesUserError(tmp_path, monkeypatch, fresh_resolution):
    monkeypatch.setenv("OPTINFER_SOLC", str(tmp_path / "missing-solc"))
    with pytest.raises(UserError, match="not a working solc"):
        compiler.find_solc()


def test_compile_brokenSource_raisesUserErrorWithCompilerMessage():
    source = "// SPDX-License-Identifier: MIT\npragma solidity 0.8.37;\ncontract A { uint x = ; }\n"
    with pytest.raises(UserError, match="ParserError"):
        compiler.compile_standard_json({"src/A.sol": source})


def test_loadArtifact_unknownContract_raisesUserError():
    with pytest.raises(UserError, match="optinfer.contracts.build"):
        load_artifact("NoSuchContract")
