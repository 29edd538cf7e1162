"""The lock (requirements/*.txt) agrees with pyproject.toml: every requirement pinned, within its range."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.harness import ROOT

PINNED = re.compile(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)", re.M)


def pins(name: str) -> dict[str, str]:
    text = (ROOT / "requirements" / name).read_text()
    return {canonicalize_name(m.group(1)): m.group(2) for m in PINNED.finditer(text)}


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


@pytest.mark.parametrize(
    ("lock", "extras"), [("runtime.txt", ()), ("dev.txt", ("dev",)), ("gpu.txt", ("gpu",))]
)
def test_every_requirement_is_pinned_within_its_range_and_hashed(lock, extras):
    locked = pins(lock)
    for requirement in requirements(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in requirements/{lock}: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements/{lock} has {name}=={locked[name]}, outside {requirement}: run make lock"
        )
    blocks = [b for b in re.split(r"\n(?=[a-z0-9])", (ROOT / "requirements" / lock).read_text()) if "==" in b]
    assert blocks and all("--hash=sha256:" in block for block in blocks)


def test_the_runtime_and_dev_locks_agree_on_every_shared_package():
    runtime, dev = pins("runtime.txt"), pins("dev.txt")
    assert {n: v for n, v in runtime.items() if dev.get(n) != v} == {}
