"""Settings: sources and their priority, and one clear UserError per bad or missing setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optinfer.contracts.localchain import dev_accounts
from optinfer.errors import UserError
from optinfer.services.settings import Settings, env_name, load_settings

# Anvil's first development key: public knowledge, never a real secret.
DEV_KEY = "0x" + bytes(dev_accounts()[0].key).hex()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_run_the_embedded_demo(tmp_path):
    settings = load_settings()
    assert settings.rpc_url == "http://127.0.0.1:8545"
    assert settings.confirmations == 0
    assert settings.broker_url is None
    state = tmp_path / "state"  # the autouse fixture's OPTINFER_STATE_DIR
    assert settings.database == f"sqlite:///{state / 'optinfer.db'}"
    assert settings.deployments_file == state / "deployments.json"
    assert settings.model_dir is None  # model_path: the committed tiny-r1


def test_priority_is_arguments_then_environment_then_file(tmp_path, monkeypatch):
    config = write_config(tmp_path / "node.toml", 'rpc_url = "http://file:1"\n'
                          'confirmations = 3\npoll_interval = 0.25\n')
    monkeypatch.setenv("OPTINFER_CONFIG", str(config))
    monkeypatch.setenv("OPTINFER_CONFIRMATIONS", "5")
    settings = load_settings(rpc_url="http://argument:2")
    assert settings.rpc_url == "http://argument:2"
    assert settings.confirmations == 5
    assert settings.poll_interval == 0.25
    # An option left unset (None) falls through to the lower sources.
    assert load_settings(rpc_url=None).rpc_url == "http://file:1"


def test_config_path_from_argument(tmp_path):
    config = write_config(tmp_path / "c.toml", "max_block_range = 10\n")
    assert load_settings(config=config).max_block_range == 10


def test_postgres_urls_mean_psycopg():
    settings = load_settings(database_url="postgresql://u@db:5432/optinfer")
    assert settings.database == "postgresql+psycopg://u@db:5432/optinfer"


def test_conventional_database_url_is_read_below_optinfer_s_own(tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.toml", 'database_url = "sqlite:///file.db"\n')
    monkeypatch.setenv("OPTINFER_CONFIG", str(config))
    assert load_settings().database == "sqlite:///file.db"
    monkeypatch.setenv("DATABASE_URL", "postgres://app@db:5432/app")  # as Heroku sets it
    assert load_settings().database == "postgresql+psycopg://app@db:5432/app"
    monkeypatch.setenv("OPTINFER_DATABASE_URL", "sqlite:///mine.db")
    assert load_settings().database == "sqlite:///mine.db"
    monkeypatch.delenv("OPTINFER_DATABASE_URL")
    monkeypatch.setenv("DATABASE_URL", "mysql://x/y")
    with pytest.raises(UserError, match=r"database_url \(OPTINFER_DATABASE_URL or DATABASE_URL\)"
                                        r": must start with sqlite"):
        load_settings()


def test_key_is_normalised_and_kept_secret():
    settings = load_settings(provider_key=DEV_KEY.removeprefix("0x").upper())
    assert settings.provider_key.get_secret_value() == DEV_KEY
    assert DEV_KEY.removeprefix("0x") not in repr(settings)
    assert settings.signer("provider", chain_id=1).address == dev_accounts()[0].address


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("OPTINFER_RPC_URL", "localhost:8545", "must be an http:// or https:// URL"),
        ("OPTINFER_RPC_URL", "ftp://example.org", "must be an http:// or https:// URL"),
        ("OPTINFER_PROVIDER_KEY", "0x1234", "must be 0x followed by 64 hex digits"),
        ("OPTINFER_CHALLENGER_KEY", "0x" + "0" * 64, "not a valid secp256k1 private key"),
        ("OPTINFER_CONFIRMATIONS", "-1", "greater than or equal to 0"),
        ("OPTINFER_POLL_INTERVAL", "soon", "valid number"),
        ("OPTINFER_DATABASE_URL", "mysql://x/y", "must start with sqlite:/// or postgresql"),
        ("OPTINFER_BROKER_URL", "http://x", "must be a redis:// or amqp:// URL"),
        ("OPTINFER_MODEL_DIR", "/nonexistent", "has no manifest.json"),
        ("OPTINFER_GENERATION_CPUS", "last", "is not auto, none, or a CPU list"),
        ("OPTINFER_GENERATION_CPUS", "3-1", "the range 3-1 runs backwards"),
    ],
)
def test_bad_environment_value_is_one_line_naming_the_variable(monkeypatch, variable, value,
                                                               expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(UserError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message
    assert variable in message
    assert expected in message
    if variable.endswith("_KEY"):
        assert value.removeprefix("0x") not in message  # a key is never echoed


def test_bad_value_in_config_file_names_the_key(tmp_path):
    config = write_config(tmp_path / "c.toml", 'rpc_url = "nope"\n')
    with pytest.raises(UserError, match=r"rpc_url \(OPTINFER_RPC_URL\): must be an http"):
        load_settings(config=config)


def test_unknown_key_in_config_file_is_refused(tmp_path):
    config = write_config(tmp_path / "c.toml", 'rpc_ulr = "http://x:1"\n')
    with pytest.raises(UserError, match="unknown setting.*rpc_ulr"):
        load_settings(config=config)


def test_missing_or_malformed_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTINFER_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(UserError, match="absent.toml.*not found"):
        load_settings()
    monkeypatch.setenv("OPTINFER_CONFIG", str(write_config(tmp_path / "bad.toml", "a = = 1")))
    with pytest.raises(UserError, match="not valid TOML"):
        load_settings()


def test_missing_key_on_a_public_chain_names_the_variable():
    with pytest.raises(UserError) as raised:
        load_settings().signer("challenger", chain_id=1)
    assert "OPTINFER_CHALLENGER_KEY" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_dev_chain_falls_back_to_anvil_accounts():
    settings = load_settings()
    accounts = dev_accounts()
    assert settings.signer("deployer", 31337).address == accounts[0].address
    assert settings.signer("provider", 31337).address == accounts[1].address
    assert settings.signer("challenger", 31337).address == accounts[2].address


def test_every_setting_has_an_environment_variable():
    assert env_name("rpc_url") == "OPTINFER_RPC_URL"
    assert all(field.description for field in Settings.model_fields.values())


REPO = Path(__file__).resolve().parents[2]
PACKAGE_FOLDERS = ("optinfer_root", "models", "prover", "challenger", "contracts", "services")


def test_operators_doc_lists_exactly_the_settings_the_code_reads():
    doc = (REPO / "docs" / "operators.md").read_text(encoding="utf-8")
    section = doc.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(OPTINFER_[A-Z0-9_]+)` \| (\S+) \|", section, re.MULTILINE)
    documented = {variable for variable, _ in rows}
    # Variables some module reads itself, outside Settings (the anvil and solc binaries).
    read_directly = set()
    for folder in PACKAGE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            read_directly |= set(re.findall(r'"(OPTINFER_[A-Z0-9_]+)"',
                                            path.read_text(encoding="utf-8")))
    assert documented == {env_name(name) for name in Settings.model_fields} | read_directly
    # The config-file column names each setting's key (none for the file itself).
    for variable, key in rows:
        field = variable.removeprefix("OPTINFER_").lower()
        if field in Settings.model_fields and field != "config":
            assert key == f"`{field}`", variable
        else:
            assert key == "—", variable
