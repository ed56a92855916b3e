"""Dependencies: every runtime dependency is imported by the product, and the lock files pin what
pyproject.toml asks for, each pin with its hashes (what `make lock` writes and the venv, the
bundle and the Docker image install from)."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PRODUCT = ("zerodown_proxy", "orchestrator")  # what a bundle and the image ship


def imported_top_level_modules(packages: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


def test_every_runtime_dependency_is_imported_by_the_product():
    imported = imported_top_level_modules(PRODUCT)
    by_distribution: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for d in dists:
            by_distribution.setdefault(canonicalize_name(d), set()).add(module)
    unused = []
    for spec in PYPROJECT["project"]["dependencies"]:
        name = canonicalize_name(Requirement(spec).name)
        modules = by_distribution.get(name)
        assert modules, f"{name} is a dependency but not installed in this venv"
        if not modules & imported:
            unused.append(f"{name} (provides {sorted(modules)})")
    assert not unused, f"runtime dependencies nothing imports: {unused}"


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9._-]+)==([^\s\\;]+)", block)
        if m:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            pins[canonicalize_name(m[1])] = (m[2], hashes)
    return pins


def assert_satisfies(lock: dict[str, tuple[str, list[str]]], specs: list[str], where: str) -> None:
    for spec in specs:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in lock, f"{where} does not pin {name} ({spec}): run `make lock`"
        version, hashes = lock[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{where} pins {name}=={version}, outside {spec}: run `make lock`"
        )
        assert hashes, f"{where} pins {name} without hashes"


def test_runtime_lock_pins_every_runtime_dependency_and_nothing_of_the_extras():
    lock = read_lock(ROOT / "requirements.lock")
    assert_satisfies(lock, PYPROJECT["project"]["dependencies"], "requirements.lock")
    assert all(h for _, h in lock.values())
    extras_only = {canonicalize_name(Requirement(s).name)
                   for specs in PYPROJECT["project"]["optional-dependencies"].values()
                   for s in specs}  # fmt: skip
    assert not extras_only & set(lock), "test/bench packages leaked into the runtime lock"


def test_dev_lock_adds_the_extras_and_agrees_with_the_runtime_lock():
    dev = read_lock(ROOT / "requirements-dev.lock")
    runtime = read_lock(ROOT / "requirements.lock")
    assert_satisfies(dev, PYPROJECT["project"]["dependencies"], "requirements-dev.lock")
    for specs in PYPROJECT["project"]["optional-dependencies"].values():
        assert_satisfies(dev, specs, "requirements-dev.lock")
    differ = {n: (v, dev[n][0]) for n, (v, _) in runtime.items() if n in dev and dev[n][0] != v}
    assert not differ, f"the dev venv would test other versions than a bundle ships: {differ}"
    assert set(runtime) <= set(dev)


def test_build_lock_satisfies_the_build_system():
    lock = read_lock(ROOT / "requirements-build.lock")
    assert_satisfies(lock, PYPROJECT["build-system"]["requires"], "requirements-build.lock")
    assert "pip" in lock  # the bundle's wheel choice must not depend on the machine's pip
