"""Every subcommand of DESIGN §6 exists and answers --help."""

from __future__ import annotations

import pytest

from keypulse.cli import COMMANDS, main


def test_the_commands_of_the_design_exist() -> None:
    assert set(COMMANDS) == {"kafka", "migrate", "run", "pipeline", "api", "ws", "gen", "token"}


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
