"""One settings layer for every command: flags, ``SPLITKD_*`` variables and a TOML file.

Each command's options are the fields of one pydantic-settings class (for example
``edge_agent/settings.py``). The argparse flags, the environment variables, the
config-file keys, ``--help`` and ``docs/CONFIGURATION.md`` are all generated from
those fields, so they cannot disagree. Precedence, highest first::

    command-line flag > SPLITKD_<FIELD> > config file (--config FILE or SPLITKD_CONFIG) > default

A config file is TOML: top-level keys apply to every command of the program that has
that option, a table named after the command (``[train]``, ``[serve]``) to that one.

**Adding an option is one line** in the command's settings class (``edge_agent/settings.py``,
``cloud_service/settings.py``; options shared by several commands sit in a small mixin
there, such as ``ProfileOptions``)::

    keep_versions: int = option(3, "model versions kept per model name")

That gives ``--keep-versions``, ``SPLITKD_KEEP_VERSIONS`` and the config key
``keep_versions``, validated as an int, in ``--help`` with its variable and default;
the command's handler reads ``options.keep_versions`` (for ``splitkd-edge train``, a field
named like a field of ``edge_agent.run.TrainOptions`` is passed on to it unasked). A ``bool`` field becomes a
``store_true`` flag (``fresh: bool = option(False, "...")`` gives ``--fresh``), a
``Literal["a", "b"]`` field a flag with choices, ``option(help="...")`` with no default a
required option. ``flag="--json"`` names a flag unlike the field, ``group=`` a --help
section, ``exclusive="x"`` a set of mutually exclusive flags, ``cli_only=True`` an option
that names what one invocation acts on (not read from the environment or a file),
``shown_default=`` a default computed at run time. Then ``make config-doc`` regenerates
docs/CONFIGURATION.md; ``make test`` (and tests/test_settings.py) fails until you do.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import Field, JsonValue, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from splitkd.errors import SplitKDError

ENV_PREFIX = "SPLITKD_"
CONFIG_ENV = "SPLITKD_CONFIG"
# The config file's values while one settings object is built (see Options.load).
_file_values: ContextVar[dict[str, Any] | None] = ContextVar("splitkd_config_values", default=None)
T = TypeVar("T", bound="Options")


class SettingsError(SplitKDError):
    """A bad flag, variable or config-file key: one line, exit code 2."""


def option(
    default: Any = ...,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    shown_default: str | None = None,
    flag: str | None = None,
    group: str | None = None,
    exclusive: str | None = None,
    positional: bool = False,
    cli_only: bool = False,
    metavar: str | None = None,
) -> Any:
    """A settings field: its default (``...``: required), help text and how it is given.

    ``shown_default`` is the default as --help and the docs state it, for defaults
    computed at run time (``the host name``).
    """
    extra = {
        "flag": flag,
        "group": group,
        "exclusive": exclusive,
        "positional": positional or None,
        "cli_only": (cli_only or positional) or None,
        "shown_default": shown_default,
        "metavar": metavar,
    }
    given: dict[str, JsonValue] = {key: value for key, value in extra.items() if value is not None}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=given)
    return Field(default, description=help, json_schema_extra=given)


def meta(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


class _EnvSource(EnvSettingsSource):
    """The environment, except for command-line-only options."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if meta(field).get("cli_only"):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class Options(BaseSettings):
    """Base of every command's settings: ``SPLITKD_`` variables, flags, a config file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # SPLITKD_X= in a unit file means "not set"
        extra="forbid",
        protected_namespaces=(),
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
        # init_settings holds the flags given on the command line.
        file_settings = InitSettingsSource(settings_cls, init_kwargs=_file_values.get() or {})
        return init_settings, _EnvSource(settings_cls), file_settings

    @classmethod
    def load(cls: type[T], flags: dict[str, Any], file_values: dict[str, Any], where: str) -> T:
        """Flags > environment > ``file_values`` (from ``where``) > defaults, or SettingsError."""
        token = _file_values.set(file_values)
        try:
            return cls(**flags)
        except ValidationError as exc:
            raise SettingsError(_describe(cls, exc, flags, file_values, where)) from None
        finally:
            _file_values.reset(token)


def flag_of(name: str, info: FieldInfo) -> str:
    if meta(info).get("positional"):
        return name.upper()
    return str(meta(info).get("flag") or "--" + name.replace("_", "-"))


def env_of(name: str, info: FieldInfo) -> str | None:
    return None if meta(info).get("cli_only") else ENV_PREFIX + name.upper()


def _describe(
    cls: type[Options],
    exc: ValidationError,
    flags: dict[str, Any],
    file_values: dict[str, Any],
    where: str,
) -> str:
    """The first error as one line naming the flag, variable or file key it came from."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"] or error["loc"][0] not in cls.model_fields:
        return message
    name = str(error["loc"][0])
    info = cls.model_fields[name]
    flag, env = flag_of(name, info), env_of(name, info)
    if error["type"] == "missing":
        also = f" (or {env}, or '{name}' in a config file)" if env else ""
        return f"{flag} is required{also}"
    if name in flags:
        source = flag
    elif env and any(key.upper() == env for key in os.environ):
        source = env
    elif name in file_values:
        source = f"{where}: {name}"
    else:
        source = f"{flag} (default)"
    secret = "credential" in name or "token" in name
    got = "" if secret else f" (got {error.get('input')!r})"  # never echo secrets
    return f"{source}: {message}{got}"


def _is_bool(info: FieldInfo) -> bool:
    return info.annotation is bool


def _choices(info: FieldInfo) -> tuple[Any, ...] | None:
    return get_args(info.annotation) if get_origin(info.annotation) is Literal else None


def shown_default(info: FieldInfo) -> str | None:
    """The default as --help and the docs state it (None: required, or nothing to say)."""
    if "shown_default" in meta(info):
        return str(meta(info)["shown_default"])
    if info.is_required() or info.default is None or info.default is False:
        return None
    return str(info.default)


def _help(name: str, info: FieldInfo) -> str:
    notes = [note for note in (env_of(name, info),) if note]
    default = shown_default(info)
    if default is not None:
        notes.append(f"default {default}")
    text = info.description or ""
    if notes:
        text = f"{text} ({'; '.join(notes)})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_arguments(parser: argparse.ArgumentParser, settings: type[Options]) -> None:
    """One flag per field. Flags left out stay out of the namespace (SUPPRESS), so the
    environment, the config file and the default still apply to them."""
    groups: dict[str, Any] = {}
    for name, info in settings.model_fields.items():
        _add_field(_target(parser, meta(info), groups), name, info)
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"TOML file of options, below flags and environment ({CONFIG_ENV}; "
        "docs/CONFIGURATION.md)",
    )


def _target(parser: argparse.ArgumentParser, extra: dict[str, Any], groups: dict[str, Any]) -> Any:
    """The parser, or the --help section or mutually exclusive set the field belongs to."""
    if "exclusive" in extra:
        key = "exclusive:" + extra["exclusive"]
        if key not in groups:
            groups[key] = parser.add_mutually_exclusive_group()
        return groups[key]
    if "group" in extra:
        if extra["group"] not in groups:
            groups[extra["group"]] = parser.add_argument_group(extra["group"])
        return groups[extra["group"]]
    return parser


def _add_field(target: Any, name: str, info: FieldInfo) -> None:
    extra = meta(info)
    flag = flag_of(name, info)
    kwargs: dict[str, Any] = {"help": _help(name, info)}
    if extra.get("positional"):
        target.add_argument(name, metavar=extra.get("metavar"), **kwargs)
        return
    kwargs |= {"dest": name, "default": argparse.SUPPRESS}
    if _is_bool(info):
        kwargs["action"] = "store_true"
    elif _choices(info):
        kwargs["choices"] = _choices(info)  # argparse shows {a,b} as the metavar
    else:
        kwargs["metavar"] = extra.get("metavar") or flag.lstrip("-").replace("-", "_").upper()
        if get_origin(info.annotation) is list:
            kwargs["action"] = "append"
    target.add_argument(flag, **kwargs)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``name`` may be two words (``devices add``) for a nested one."""

    name: str
    settings: type[Options]
    handler: Callable[[Any], int]
    help: str
    description: str | None = None


@dataclass(frozen=True)
class Program:
    """A command-line program whose subcommands each have one settings class."""

    prog: str
    description: str
    commands: Sequence[Command]
    global_options: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    group_help: dict[str, str] = field(default_factory=dict)

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        self.global_options(parser)
        sub = parser.add_subparsers(dest="command", required=True)
        nested: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
        for command in self.commands:
            words = command.name.split()
            target = sub
            if len(words) == 2:
                if words[0] not in nested:
                    outer = sub.add_parser(words[0], help=self.group_help.get(words[0]))
                    nested[words[0]] = outer.add_subparsers(
                        dest=f"{words[0]}_command", required=True
                    )
                target = nested[words[0]]
            child = target.add_parser(
                words[-1], help=command.help, description=command.description or command.help
            )
            add_arguments(child, command.settings)
            child.set_defaults(_command=command)
        return parser

    def parse(self, argv: list[str] | None) -> tuple[argparse.Namespace, Command, Options]:
        """Parse ``argv`` and build the command's settings (SettingsError on bad values)."""
        args = self.parser().parse_args(argv)
        command: Command = args._command
        fields = command.settings.model_fields
        flags = {key: value for key, value in vars(args).items() if key in fields}
        config = getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None
        values = self.config_values(Path(config), command) if config else {}
        return args, command, command.settings.load(flags, values, str(config))

    def config_values(self, path: Path, command: Command) -> dict[str, Any]:
        """The file's top-level keys and its ``[command]`` table, checked against the fields."""
        data = read_toml(path)
        section: Any = data
        for word in command.name.split():
            section = section.get(word, {}) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            raise SettingsError(f"{path}: [{command.name}] must be a table of options")
        for other in self.commands:
            data.pop(other.name.split()[0], None)
        known = {key for key, _ in self.file_keys()}
        mine = command.settings.model_fields
        values: dict[str, Any] = {}
        for table, entries in (("", data), (f"[{command.name}] ", section)):
            for raw_key, value in entries.items():
                key = raw_key.replace("-", "_")
                if key not in known or (table and key not in mine):
                    raise SettingsError(f"{path}: unknown option {table}{raw_key!r}")
                if key in mine and not meta(mine[key]).get("cli_only"):
                    values[key] = value
        return values

    def file_keys(self) -> Iterator[tuple[str, FieldInfo]]:
        for command in self.commands:
            for name, info in command.settings.model_fields.items():
                if not meta(info).get("cli_only"):
                    yield name, info


def read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # only when a config file is given

    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def type_name(info: FieldInfo) -> str:
    """A field's type as the docs state it."""
    choices = _choices(info)
    if choices:
        return "one of " + ", ".join(map(str, choices))
    if get_origin(info.annotation) is list:
        return "repeatable"
    names = {bool: "flag", int: "integer", float: "number", Path: "path", str: "text"}
    for kind, name in names.items():
        if info.annotation is kind or info.annotation == kind | None:
            return name
    return str(info.annotation)


def reference_table(settings: type[Options]) -> list[str]:
    """A Markdown table of one command's options: flag, variable, key, type, default, help."""
    lines = [
        "| Flag | Environment | Config key | Type | Default | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in settings.model_fields.items():
        env = env_of(name, info)
        cells = [
            f"`{flag_of(name, info)}`",
            f"`{env}`" if env else "command line only",
            f"`{name}`" if env else "—",
            type_name(info),
            "required" if info.is_required() else (shown_default(info) or "—"),
            (info.description or "").replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
