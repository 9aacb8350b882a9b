"""The README's commands are the ones CI runs, and they never pull a CUDA build of torch."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    return [line.strip() for line in lines[1:6] if line.strip().startswith("python -m pip install")]


def test_readme_starts_with_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "fxcurv inspect" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_cpu_torch_is_pinned_before_anything_pulls_torch():
    for command in _readme_commands():
        assert "torch==2.13.0" in command.split("&&")[0]
