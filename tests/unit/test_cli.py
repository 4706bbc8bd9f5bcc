"""Every subcommand of DESIGN §6 exists and answers --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keypulse.cli import COMMANDS, build_parser, main


def test_the_commands_of_the_design_exist() -> None:
    assert set(COMMANDS) == {"kafka", "migrate", "run", "pipeline", "api", "ws", "gen", "token",
                             "sql", "dlq"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"keypulse {command}" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--host", "--port"])
@pytest.mark.parametrize("command", ["run", "api", "ws"])
def test_servers_take_host_and_port(command: str, flag: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert flag in capsys.readouterr().out


def test_only_the_invoked_command_is_imported() -> None:
    code = ("import sys; from keypulse.cli import build_parser; build_parser(['pipeline']); "
            "print(sorted(m for m in sys.modules if m.startswith('keypulse.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['keypulse.commands.pipeline']"


def test_the_cli_never_loads_pyarrow() -> None:
    # chDB imports pyarrow, when installed, for Arrow APIs keypulse does not use (0.1 s, 70 MB).
    code = ("import sys; from keypulse.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "import clickhouse_connect.driver._chdbclient\n"
            "print(sys.modules.get('pyarrow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == "None"  # after the version line


def test_pipeline_takes_a_stop_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert "--stop-timeout" in capsys.readouterr().out
    args = build_parser(["pipeline"]).parse_args(["pipeline", "--stop-timeout", "2.5"])
    assert args.stop_timeout == 2.5
