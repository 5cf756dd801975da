"""The package as pip sees it: pyproject.toml's pins agree with requirements*.txt (which setup.sh installs), the
`streamchat` console script is the command line, and what the package needs at run time (kernels.c, the configs,
the sample text) is declared as package data."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pins(path: Path) -> dict[str, str]:
    """name -> full requirement of each line of a requirements file (comments and blank lines skipped)."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found[canonical(line)] = line.replace(" ", "")
    return found


def canonical(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def as_pins(requirements: list[str]) -> dict[str, str]:
    return {canonical(r): r.replace(" ", "") for r in requirements}


def test_runtime_dependencies_match_requirements_txt():
    assert as_pins(PROJECT["project"]["dependencies"]) == pins(ROOT / "requirements.txt")


def test_dev_extras_match_requirements_dev_txt():
    assert as_pins(PROJECT["project"]["optional-dependencies"]["dev"]) == pins(ROOT / "requirements-dev.txt")


def test_every_requirement_is_pinned():
    for requirement in [*PROJECT["project"]["dependencies"], *PROJECT["project"]["optional-dependencies"]["dev"]]:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.]*", requirement), requirement


def test_console_script_is_the_command_line():
    import importlib

    module, _, function = PROJECT["project"]["scripts"]["streamchat"].partition(":")
    from streamchat import cli

    assert getattr(importlib.import_module(module), function) is cli.main
    assert PROJECT["project"]["requires-python"] == ">=3.11"


def test_every_package_and_its_data_is_declared():
    """Each folder of modules under streamchat/ is listed (a new one would be missing from `pip install .`), and
    the run-time files are package data: kernels.c (native.py builds it), the configs, the sample text."""
    setuptools = PROJECT["tool"]["setuptools"]
    folders = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "streamchat").rglob("__init__.py")} | {
        "streamchat.configs",
        "streamchat.data",
    }
    assert set(setuptools["packages"]) == folders
    assert setuptools["package-dir"] == {"streamchat.configs": "configs"}
    data = setuptools["package-data"]
    assert "kernels.c" in data["streamchat"]
    for package, folder in (("streamchat.configs", ROOT / "configs"), ("streamchat.data", ROOT / "streamchat/data")):
        shipped = {p.name for pattern in data[package] for p in folder.glob(pattern)}
        assert shipped == {p.name for p in folder.iterdir() if p.is_file()}, package
