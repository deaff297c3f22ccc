"""Configuration of the services: environment variables ``OPTINFER_*`` and one TOML file.

Each setting is read, highest priority first, from: the arguments a command passes (its
command-line options), the environment (``OPTINFER_<NAME>``, empty values count as unset;
then ``DATABASE_URL`` for the database, as hosting platforms set it), the config file
(``<name> = value`` at the top level; path from ``--config`` or ``OPTINFER_CONFIG``), and the
defaults below, which run the embedded demo: a local anvil on port 8545, a SQLite file under
``~/.optinfer``, Celery in eager mode.

:func:`load_settings` is the one way in: whatever is wrong with the settings (a malformed key,
a URL of the wrong scheme, a missing file, an unknown key in the file) becomes one
:class:`UserError` naming the variable. docs/operators.md lists every setting; a test keeps
that list and the fields of :class:`Settings` equal.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from optinfer.errors import UserError

ENV_PREFIX = "OPTINFER_"
DEFAULT_STATE_DIR = Path("~/.optinfer")
MIN_API_KEY_LENGTH = 16
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

Signer = Literal["deployer", "provider", "challenger", "consumer"]

# Which of anvil's funded development accounts stands in for each role when no key is set
# and the chain is anvil's development chain (see Settings.signer).
DEV_ACCOUNT_INDEX: dict[str, int] = {"deployer": 0, "provider": 1, "challenger": 2,
                                     "consumer": 3}


PLATFORM_ENV: dict[str, str] = {"database_url": "DATABASE_URL"}
"""Settings that are also read from a conventional variable when their OPTINFER_ one is unset."""


def env_name(field: str) -> str:
    """The environment variable of setting `field` (``rpc_url`` -> ``OPTINFER_RPC_URL``)."""
    return ENV_PREFIX + field.upper()


class Settings(BaseSettings):
    """Every setting the services read. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True
    )

    config: Path | None = Field(
        None, description="TOML file with any of these settings (keys are the lower-case names)."
    )
    rpc_url: str = Field(
        "http://127.0.0.1:8545", description="JSON-RPC endpoint of the chain (http or https)."
    )
    request_timeout: float = Field(
        30.0, gt=0, description="Seconds before one JSON-RPC request counts as failed."
    )
    rpc_attempts: int = Field(
        5, ge=1, description="Tries of one JSON-RPC request when the node drops or times out."
    )
    rpc_backoff: float = Field(
        0.5, ge=0, description="Seconds before the first retry; doubles with each retry (≤ 30)."
    )
    confirmations: int = Field(
        0,
        ge=0,
        description="Blocks an event must be buried under before it is acted on, whichever "
        "node recorded it (0 suits anvil, which never reorganises; use 12 or more on a public "
        "chain; a deeper reorganisation is still noticed and read again).",
    )
    poll_interval: float = Field(
        1.0, gt=0, description="Seconds between two polls of the chain for new blocks."
    )
    max_block_range: int = Field(
        2000, ge=1, description="Most blocks asked for in one eth_getLogs call."
    )
    deployer_key: SecretStr | None = Field(
        None, description="Private key that deploys the contracts (0x + 64 hex digits)."
    )
    provider_key: SecretStr | None = Field(
        None, description="Private key of the provider node (0x + 64 hex digits)."
    )
    challenger_key: SecretStr | None = Field(
        None, description="Private key of the watchtower (0x + 64 hex digits)."
    )
    consumer_key: SecretStr | None = Field(
        None,
        description="Private key that pays for the requests `optinfer request` and "
        "POST /v1/requests post (0x + 64 hex digits).",
    )
    api_key: SecretStr | None = Field(
        None,
        description="Secret that clients send in the X-API-Key header to POST /v1/requests "
        "(unset: the HTTP API does not post requests).",
    )
    state_dir: Path = Field(
        DEFAULT_STATE_DIR,
        description="Directory of the node's own files: SQLite database, deployments, chain.",
    )
    deployments: Path | None = Field(
        None,
        description="JSON file of contract addresses written by `optinfer contracts deploy` "
        "(default: <state_dir>/deployments.json).",
    )
    model_dir: Path | None = Field(
        None, description="Integer model directory (default: the committed tiny-r1)."
    )
    generation_cpus: str = Field(
        "auto",
        description="CPUs of the provider's generation process, its serving threads taking "
        "the others: auto (the last --threads CPUs, when there are more), none (no pinning), "
        "or a list such as 3, 2-3 or 1,3.",
    )
    max_batch: int = Field(
        8, ge=1, le=1024,
        description="Requests the provider's generation process decodes together (continuous "
        "batching: one joins as another finishes); 1 decodes them one at a time.",
    )
    kv_cache_budget_mb: float | None = Field(
        None, gt=0,
        description="MiB of KV cache the provider's batch may hold, each request counted at "
        "its full length (prompt plus max tokens): past it a request waits for room, though a "
        "request alone always runs (unset: max_batch is the only limit).",
    )
    provider_lie: Literal["off", "last-token"] = Field(
        "off",
        description="Demonstrations only: last-token makes the provider node commit its "
        "answer with the last token before EOS changed and defend the lie, so that it loses its "
        "disputes.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://... "
        "(default: sqlite:///<state_dir>/optinfer.db).",
    )
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://127.0.0.1:6379/0 (default: eager mode)."
    )
    celery_queue: str = Field(
        "optinfer", min_length=1, description="Celery queue the watchtower's tasks go through."
    )
    sampling_rate: float = Field(
        1.0, gt=0, le=1,
        description="Share of claims the watchtower verifies (1: every claim).",
    )
    game_lease: float = Field(
        60.0, gt=0,
        description="Seconds a watchtower worker holds a game or a challenge before another "
        "worker may take it over (longer than one transaction takes to be mined).",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the watchtower's Prometheus metrics on 0.0.0.0 (unset: none).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets directory: one file, named explicitly, is easier to reason about.
        return init_settings, env_settings, PlatformEnvSource(settings_cls), \
            ConfigFileSource(settings_cls)

    # -- validation ------------------------------------------------------------------------

    @field_validator("rpc_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("deployer_key", "provider_key", "challenger_key", "consumer_key")
    @classmethod
    def _private_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        digits = value.get_secret_value().strip().removeprefix("0x")
        if len(digits) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digits):
            # Never echo the value: it may be a real key with a typo.
            raise ValueError("must be 0x followed by 64 hex digits")
        if not 0 < int(digits, 16) < SECP256K1_ORDER:
            raise ValueError("is not a valid secp256k1 private key")
        return SecretStr("0x" + digits.lower())

    @field_validator("generation_cpus")
    @classmethod
    def _cpu_choice(cls, value: str) -> str:
        # Only the syntax here: which CPUs exist is the machine's, checked when the node starts.
        value = value.strip()
        if value not in ("auto", "none"):
            from optinfer.models.generation import parse_cpu_list

            parse_cpu_list(value)
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A short key can be guessed by anyone who can reach the API.
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(f"must be at least {MIN_API_KEY_LENGTH} characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        # Plain postgres URLs (as most hosting hands them out) mean psycopg 3 here.
        if scheme in ("postgres", "postgresql"):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        if scheme not in ("sqlite", "postgresql+psycopg"):
            raise ValueError(
                f"must start with sqlite:/// or postgresql+psycopg://, got {scheme or value!r}"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if urlsplit(value).scheme not in ("redis", "rediss", "amqp", "amqps"):
            raise ValueError(f"must be a redis:// or amqp:// URL, got {value!r}")
        return value

    @field_validator("state_dir", "deployments", "model_dir", "config")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("model_dir", mode="after")
    @classmethod
    def _model_dir_has_manifest(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "manifest.json").is_file():
            raise ValueError(f"{value} has no manifest.json (not a converted integer model)")
        return value

    # -- derived values --------------------------------------------------------------------

    @property
    def deployments_file(self) -> Path:
        """Where the contract addresses are (``deployments``, else under ``state_dir``)."""
        return self.deployments or self.state_dir / "deployments.json"

    @property
    def database(self) -> str:
        """The SQLAlchemy URL of the node's database (``database_url``, else SQLite)."""
        return self.database_url or f"sqlite:///{self.state_dir / 'optinfer.db'}"

    @property
    def model_path(self) -> Path:
        """The integer model directory (``model_dir``, else the committed tiny-r1)."""
        if self.model_dir is not None:
            return self.model_dir
        # Found without importing optinfer.models.tiny_r1, whose training code pulls in torch
        # (seconds of start-up for every service).
        import optinfer.models

        return Path(optinfer.models.__path__[0]) / "tiny-r1" / "integer"

    def signer(self, role: Signer, chain_id: int):
        """The LocalAccount that signs for `role` on the chain `chain_id`.

        Without a configured key, anvil's development chain (chain id 31337) falls back to
        one of its funded development accounts, so the demo needs no keys; any other chain
        needs the key, and its absence is a UserError naming the variable.
        """
        from eth_account import Account

        from optinfer.contracts.localchain import CHAIN_ID, dev_accounts

        key: SecretStr | None = getattr(self, f"{role}_key")
        if key is not None:
            return Account.from_key(key.get_secret_value())
        if chain_id == CHAIN_ID:
            return dev_accounts()[DEV_ACCOUNT_INDEX[role]]
        field = f"{role}_key"
        raise UserError(
            f"missing setting {field} ({env_name(field)}): the {role}'s "
            f"private key, 0x + 64 hex digits; chain {chain_id} is not anvil's dev chain"
        )


class PlatformEnvSource(PydanticBaseSettingsSource):
    """The variables hosting platforms and container images set by convention
    (:data:`PLATFORM_ENV`): below ``OPTINFER_*``, above the config file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads them all at once

    def __call__(self) -> dict[str, Any]:
        return {field: os.environ[name] for field, name in PLATFORM_ENV.items()
                if os.environ.get(name)}


class ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML config file named by ``config`` (``--config`` or ``OPTINFER_CONFIG``).

    It runs after the command's arguments and the environment, so it sees the path they
    chose in ``current_state`` and only fills the settings they left unset.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if path is None:
            return {}
        return read_config_file(Path(path).expanduser())


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in TOML file `path`; UserError when it is missing, malformed or has a key
    that is not a setting (a typo would otherwise be silently ignored)."""
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} (--config / {env_name('config')}) not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    # A config file naming another config file would be a chain nobody can follow.
    allowed = set(Settings.model_fields) - {"config"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise UserError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            "see docs/operators.md, Configuration"
        )
    return values


def load_settings(**overrides: Any) -> Settings:
    """Settings from `overrides` (None values are ignored: an option left unset), the
    environment, the config file and the defaults; any problem is one UserError."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as err:
        raise UserError("bad settings: " + "; ".join(_describe(e) for e in err.errors())) from None


def _describe(error: dict) -> str:
    """One validation error as ``x (OPTINFER_X): what is wrong``: the config file's key and
    the environment variable, since the value may have come from either."""
    location = error.get("loc") or ()
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not location:
        return message
    field = str(location[0])
    if field not in Settings.model_fields:
        return f"unknown setting {field!r}"
    names = " or ".join([env_name(field)] + ([PLATFORM_ENV[field]] if field in PLATFORM_ENV
                                              else []))
    return f"{field} ({names}): {message}"
