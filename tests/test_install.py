"""A fresh machine installs the versions the suite was last green with: ``constraints.txt`` pins every dependency
``pyproject.toml`` names (runtime and test extra), each pin inside the declared range, and the Makefile installs
through it."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_dependency_is_pinned_inside_its_declared_range():
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned by the Makefile's TORCH_VERSION (the CPU build), never by a bare requirement
            assert name not in pinned
            continue
        assert name in pinned, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{req.name}=={pinned[name]} outside {req}"


def test_the_makefile_installs_through_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile
    install = re.search(r"pip install .*-e \"\.\[test\]\"", makefile).group(0)
    assert "-c $(CONSTRAINTS)" in install
    assert "test-latest:" in makefile  # the suite against the newest releases, on purpose


def test_accelerate_is_bounded_above_while_its_private_state_is_touched():
    # training/fsdp.py and loop.make_accelerator reach into Accelerate's shared state: a new minor release may move it.
    accelerate = next(r for r in declared() if canonicalize_name(r.name) == "accelerate")
    assert any(spec.operator == "<" for spec in accelerate.specifier)
    assert accelerate.specifier.contains(pins()["accelerate"])
