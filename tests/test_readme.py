"""README.md stays true: every `python -m minirlhf <command> ...` line in it parses, and so does every
`torchrun ... -m minirlhf <command> ...` line."""
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

from minirlhf.__main__ import COMMANDS
from minirlhf.train.args import parse_args

README = Path(__file__).resolve().parents[1] / "README.md"
# Commands with their own argparse (not a dataclass of arguments) are covered by their own tests.
OWN_PARSER = {"data", "grade", "toy-world"}


def readme_commands():
    text = README.read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(\S+)$", text, flags=re.M))
    commands = []
    lines = re.findall(r"python -m minirlhf [^\n&|]*", text) + re.findall(r"(?<=torchrun )[^\n&|]*-m minirlhf [^\n&|]*", text)
    for line in lines:  # `python -m minirlhf CMD ...`, and torchrun's `... -m minirlhf CMD ...`
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line.split("-m minirlhf ", 1)[1]))
        if argv and argv[0] in COMMANDS and argv[0] not in OWN_PARSER and "--help" not in argv:
            commands.append(argv)
    return commands


def args_class(module):
    classes = [v for v in vars(module).values()
               if dataclasses.is_dataclass(v) and isinstance(v, type) and v.__module__ == module.__name__]
    assert len(classes) == 1, f"{module.__name__}: expected one dataclass of arguments, found {classes}"
    return classes[0]


def test_readme_shows_the_main_job_and_the_tests():
    text = README.read_text()
    assert "python -m minirlhf pipeline" in text
    assert "python -m pytest -q" in text
    assert "python3 -m pytest -q" in (README.parent / ".ci" / "run").read_text()


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_readme_command_parses(argv):
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parse_args(args_class(module), argv[1:])
