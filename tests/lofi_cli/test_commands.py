"""The `lofi` command table: every subcommand answers --help, unknown ones fail with the list, and
starting the command pays for no heavy import until a subcommand needs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lofi_cli.commands import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in out and summary[:30] in out, name


def test_an_unknown_command_is_status_2_with_the_list(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train-head" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lofi {name}" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["pretrain", "train", "extract", "train_head", "detect"])
def test_a_stage_help_says_what_makes_the_pipeline_rerun_it(stage, capsys):
    """The reuse rule comes from the stage's own CONFIG_SECTIONS, the sections its record hashes."""
    from pipelines.config import STAGES
    from pipelines.stages.pipeline import STAGE_MODULES

    assert tuple(STAGE_MODULES) == STAGES  # the orchestrator's table holds every stage, in run order
    with pytest.raises(SystemExit):
        main([stage.replace("_", "-"), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(STAGE_MODULES[stage].CONFIG_SECTIONS) in text


def test_the_command_starts_without_torch_ray_or_mlflow():
    """`lofi --help` (and the table behind every subcommand) is quick: the stages load on use."""
    code = ("import sys; from lofi_cli.commands import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
