"""The settings layer: one field gives a flag, a SPLITKD_* variable and a config-file key.

Precedence is flag > environment > config file > default; bad values end in one line
naming where they came from; docs/CONFIGURATION.md is the generated list of every option.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloud_service.cli import PROGRAM as CLOUD
from cloud_service.cli import main as cloud_main
from edge_agent.cli import PROGRAM as EDGE
from edge_agent.cli import main as edge_main
from edge_agent.settings import TrainSettings
from splitkd.settings import Command, Options, Program, SettingsError, option

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--cloud", "c:1", "--data", "digits"]
# (program, argv, field, flag value, environment value, file value, default); each
# value as it is written on the command line / in the variable, then as TOML.
CASES: list[tuple[Program, list[str], str, Any, Any, Any, Any]] = [
    (EDGE, TRAIN, "epochs", 3, 4, 5, 0),
    (
        EDGE,
        TRAIN,
        "device_profile",
        "raspberry-pi-4",
        "jetson-nano",
        "raspberry-pi-5",
        "laptop-x86",
    ),
    (EDGE, TRAIN, "metrics_linger", 1.5, 2.5, 3.5, 0.0),
    (EDGE, TRAIN, "tls_ca", Path("flag.pem"), Path("env.pem"), Path("file.pem"), None),
    (EDGE, ["serve"], "http_port", 9001, 9002, 9003, 8001),
    (CLOUD, ["serve"], "optimizer", "sgd", "adam", "sgd", "adam"),
    (CLOUD, ["serve"], "seed", 7, 8, 9, 1),
]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SPLITKD_") and name != "SPLITKD_LOG_LEVEL":
            monkeypatch.delenv(name)


def toml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str | Path) else repr(value)


def flag_for(field: str) -> str:
    return "--" + field.replace("_", "-")


@pytest.mark.parametrize(("program", "argv", "field", "flag", "env", "file", "default"), CASES)
def test_flag_beats_environment_beats_config_file_beats_default(
    program: Program,
    argv: list[str],
    field: str,
    flag: Any,
    env: Any,
    file: Any,
    default: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def value(*extra: str) -> Any:
        return getattr(program.parse([*argv, *extra])[2], field)

    assert value() == default
    config = tmp_path / "splitkd.toml"
    config.write_text(f"{field} = {toml_value(file)}\n")
    assert value("--config", str(config)) == file
    monkeypatch.setenv("SPLITKD_CONFIG", str(config))  # the variable names the file too
    assert value() == file
    monkeypatch.setenv(f"SPLITKD_{field.upper()}", str(env))
    assert value() == env
    assert value(flag_for(field), str(flag)) == flag


def test_a_boolean_option_from_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def require_auth(*extra: str) -> bool:
        options = CLOUD.parse(["serve", *extra])[2]
        return bool(getattr(options, "require_auth"))  # noqa: B009 - ServeSettings field

    config = tmp_path / "cloud.toml"
    config.write_text("require_auth = true\n")
    assert not require_auth()
    assert require_auth("--config", str(config))
    monkeypatch.setenv("SPLITKD_REQUIRE_AUTH", "0")
    assert not require_auth("--config", str(config))  # the variable wins over the file
    assert require_auth("--require-auth")


def test_a_command_table_overrides_the_top_level_and_other_tables_are_ignored(
    tmp_path: Path,
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        'cloud = "top:1"\ndata = "digits"\ndevice_profile = "jetson-nano"\n'
        '[train]\ndevice-profile = "raspberry-pi-4"\n'
        "[serve]\nhttp_port = 9999\n"
    )
    options = EDGE.parse(["train", "--config", str(config)])[2]
    assert isinstance(options, TrainSettings)
    assert (options.cloud, options.device_profile) == ("top:1", "raspberry-pi-4")
    served = EDGE.parse(["serve", "--config", str(config)])[2]
    assert served.device_profile == "jetson-nano" and served.http_port == 9999  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"env": ("SPLITKD_EPOCHS", "many")}, "SPLITKD_EPOCHS: Input should be a valid integer"),
        ({"argv": ["--epochs", "many"]}, "--epochs: Input should be a valid integer"),
        ({"file": 'epochs = "many"'}, "splitkd.toml: epochs: Input should be a valid integer"),
        ({"file": "epoch = 3"}, "unknown option 'epoch'"),
        ({"file": "[train]\nhttp_port = 3"}, "unknown option [train] 'http_port'"),
        ({"file": "epochs = = 3"}, "is not valid TOML"),
        (
            {"env": ("SPLITKD_NO_PLOTS", "maybe")},
            "SPLITKD_NO_PLOTS: Input should be a valid boolean",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_its_source_and_exit_code_2(
    setup: dict[str, Any],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*TRAIN, *setup.get("argv", [])]
    if "env" in setup:
        monkeypatch.setenv(*setup["env"])
    if "file" in setup:
        config = tmp_path / "splitkd.toml"
        config.write_text(setup["file"] + "\n")
        argv += ["--config", str(config)]
    assert edge_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_missing_required_option_names_its_flag_and_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert edge_main(["train", "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "splitkd-edge: error: --cloud is required (or SPLITKD_CLOUD, or 'cloud' in a config file)"
    )
    monkeypatch.setenv("SPLITKD_CLOUD", "c:1")  # the variable satisfies it
    assert EDGE.parse(["train", "--data", "digits"])[2].cloud == "c:1"  # type: ignore[attr-defined]


def test_command_line_only_options_ignore_the_environment_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPLITKD_AS_JSON", "1")
    listing = CLOUD.parse(["devices", "list", "--state-dir", str(tmp_path)])[2]
    assert listing.as_json is False  # type: ignore[attr-defined]
    config = tmp_path / "cloud.toml"
    config.write_text("[devices.add]\nreplace = true\n")
    assert cloud_main(["devices", "add", "edge-a", "--config", str(config)]) == 2
    assert "unknown option [devices add] 'replace'" in capsys.readouterr().err


def test_every_existing_flag_and_command_is_still_accepted() -> None:
    """The flags the CLIs had before the settings layer, so scripts and units keep working."""
    before = {
        (
            "edge",
            "train",
        ): "--model-dir --cloud --data --shard --dirichlet-alpha --presumed-fraction "
        "--device-id --epochs --report --device-profile --link-profile --metrics-port "
        "--metrics-host --metrics-linger --no-plots --checkpoint-dir --fresh --retry-seconds "
        "--timeout --no-progress --tls-ca --tls-cert --tls-key --credential --credential-file",
        ("edge", "serve"): "--model-dir --host --http-port --device-id --device-profile "
        "--link-profile --tls-cert --tls-key",
        ("edge", "predict"): "--model-dir --input --json",
        ("edge", "pull"): "--model-dir --cloud-http --model --version --device-id --tls-ca "
        "--tls-cert --tls-key --credential --credential-file",
        ("cloud", "serve"): "--host --grpc-port --http-port --teacher --teacher-data --state-dir "
        "--presumed-fraction --student-cut --teacher-cut --epochs --batch-size --learning-rate "
        "--optimizer --kd-alpha --kd-temperature --seed --wire-dtype --checkpoint-every "
        "--max-message-mb --session-timeout --max-steps-per-second --tls-cert --tls-key "
        "--tls-ca --require-client-cert --require-auth",
        ("cloud", "train-teacher"): "--data --out --presumed-fraction",
        ("cloud", "certs"): "--out --device --host",
        ("cloud", "devices add"): "--state-dir --replace --credential-file",
        ("cloud", "devices list"): "--state-dir --json",
        ("cloud", "devices revoke"): "--state-dir",
    }
    programs = {"edge": EDGE, "cloud": CLOUD}
    for (which, name), flags in before.items():
        program = programs[which]
        parser = _subparser(program.parser(), name.split())
        assert set(flags.split()) <= set(parser._option_string_actions), (program.prog, name)


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def test_a_new_option_is_one_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe in splitkd/settings.py: one line gives the flag, the variable and the key."""

    class Settings(Options):
        keep_versions: int = option(3, "model versions kept per model name")

    program = Program("demo", "demo", (Command("prune", Settings, lambda options: 0, "prune"),))
    assert program.parse(["prune"])[2].keep_versions == 3  # type: ignore[attr-defined]
    (tmp_path / "demo.toml").write_text("[prune]\nkeep_versions = 5\n")
    monkeypatch.setenv("SPLITKD_CONFIG", str(tmp_path / "demo.toml"))
    assert program.parse(["prune"])[2].keep_versions == 5  # type: ignore[attr-defined]
    monkeypatch.setenv("SPLITKD_KEEP_VERSIONS", "6")
    assert program.parse(["prune"])[2].keep_versions == 6  # type: ignore[attr-defined]
    assert program.parse(["prune", "--keep-versions", "7"])[2].keep_versions == 7  # type: ignore[attr-defined]
    help_text = _subparser(program.parser(), ["prune"]).format_help()
    assert "SPLITKD_KEEP_VERSIONS; default 3" in help_text


def test_every_option_has_help_and_the_configuration_page_is_current() -> None:
    for program in (EDGE, CLOUD):
        for command in program.commands:
            for name, info in command.settings.model_fields.items():
                assert info.description, f"{program.prog} {command.name}: {name} has no help"
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts/config_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_settings_errors_are_splitkd_errors() -> None:
    with pytest.raises(SettingsError, match="--version: Input should be a valid integer"):
        EDGE.parse(["pull", "--cloud-http", "http://c", "--model", "m", "--version", "x"])


def test_train_settings_reach_the_training_run(tmp_path: Path) -> None:
    """A setting named like a run.TrainOptions field is passed on with no extra code."""
    from edge_agent.cli import _train_options

    argv = [*TRAIN, "--fresh", "--epochs", "7", "--no-plots", "--shard", "1/2"]
    options = _train_options(EDGE.parse([*argv, "--retry-seconds", "9"])[2], None)  # type: ignore[arg-type]
    assert (options.fresh, options.epochs, options.retry_seconds) == (True, 7, 9.0)
    assert not options.plots and options.progress and options.shard is not None
    assert options.cloud == "c:1" and options.checkpoint_dir.name == options.device_id
