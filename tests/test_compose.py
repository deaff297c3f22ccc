"""docker-compose.yml, checked without a Docker engine: every service's command is a real
entry point of this project (an `optinfer` subcommand with options it accepts, or Celery on
the project's app), every OPTINFER_* variable is a setting the code reads, the keys are the
development accounts of their roles, and the wiring (dependencies, volumes, database URL)
is consistent."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import typer
import yaml

from optinfer.contracts.localchain import dev_accounts
from optinfer.services.cli import app
from optinfer.services.settings import DEV_ACCOUNT_INDEX, Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = {name: service for name, service in SERVICES.items() if service.get("build") == "."}
SETTINGS_ENV = {env_name(field) for field in Settings.model_fields}


def _optinfer_command(argv: list[str]):
    """The click command `optinfer argv...` runs; fails on an unknown subcommand or option.
    (Typer's groups are not `click.Group` instances: a group is what has `commands`.)"""
    command = typer.main.get_command(app)
    for word in argv:
        if word.startswith("-") or not hasattr(command, "commands"):
            break
        assert word in command.commands, f"optinfer has no subcommand {word!r} here"
        command = command.commands[word]
    options = {opt for param in command.params
               for opt in (*param.opts, *getattr(param, "secondary_opts", ()))}
    for word in argv:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{argv}: {word} is not an option"
    return command


def test_the_stack_has_every_service_the_issue_names():
    assert {"postgres", "redis", "anvil", "deploy", "provider", "api", "challenger",
            "beat"} <= set(SERVICES)
    for name in ("postgres", "redis", "anvil", "api"):
        assert "healthcheck" in SERVICES[name], name
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_command_is_a_real_entry_point(name):
    argv = OURS[name]["command"]
    if argv[0] == "optinfer":
        _optinfer_command(argv[1:])
    else:
        assert argv[:3] == ["celery", "-A", "optinfer.challenger.app"], argv
        module = importlib.import_module("optinfer.challenger.app")
        from celery import Celery

        assert any(isinstance(value, Celery) for value in vars(module).values())
        assert argv[3] in {"worker", "beat"}


@pytest.mark.parametrize("name", sorted(OURS))
def test_configuration_is_environment_only_and_names_real_settings(name):
    environment = OURS[name]["environment"]
    unknown = {key for key in environment if key not in SETTINGS_ENV}
    assert not unknown, f"{name} sets variables no setting reads: {unknown}"
    assert "OPTINFER_CONFIG" not in environment
    # Every value parses as the settings would parse it (URLs, keys, numbers).
    values = {key.removeprefix("OPTINFER_").lower(): value for key, value in environment.items()}
    Settings(**values)


def test_keys_are_the_development_accounts_of_their_roles():
    accounts = dev_accounts()
    for service in OURS.values():
        for key, value in service["environment"].items():
            if key.endswith("_KEY") and key != "OPTINFER_API_KEY":
                role = key.removeprefix("OPTINFER_").removesuffix("_KEY").lower()
                expected = accounts[DEV_ACCOUNT_INDEX[role]].key.hex()
                assert value.removeprefix("0x") == expected.removeprefix("0x"), key


def test_wiring_dependencies_database_and_shared_files():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
    postgres = SERVICES["postgres"]["environment"]
    expected_url = (f"postgresql+psycopg://{postgres['POSTGRES_USER']}:"
                    f"{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}")
    for name in ("provider", "api", "challenger", "beat", "migrate"):
        env = OURS[name]["environment"]
        assert env["OPTINFER_DATABASE_URL"] == expected_url, name
    # The schema is upgraded once, by its own job, before the nodes that share the database.
    assert OURS["migrate"]["command"] == ["optinfer", "db", "upgrade"]
    assert OURS["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("provider", "api", "challenger"):
        depends = OURS[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert env["OPTINFER_RPC_URL"] == "http://anvil:8545"
    deployments = OURS["deploy"]["environment"]["OPTINFER_DEPLOYMENTS"]
    for name in ("provider", "api", "challenger", "beat"):
        assert OURS[name]["environment"]["OPTINFER_DEPLOYMENTS"] == deployments
        mounts = [volume.split(":")[1] for volume in OURS[name]["volumes"]]
        assert any(deployments.startswith(mount) for mount in mounts), name
    assert OURS["deploy"]["depends_on"]["anvil"]["condition"] == "service_healthy"
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The services run the integer model only: a plain install, without the convert extra.
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert "RUN pip install --no-cache-dir ." in instructions
    assert not any("torch" in line or "-e ." in line for line in instructions)
    assert "npm ci" in dockerfile and "ENV OPTINFER_TOOLS_DIR=/app/.tools" in instructions
