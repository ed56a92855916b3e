"""`make bundle` and `install.sh`: build the offline bundle, install it into a fresh prefix with
every package index unreachable, and run `zerodown --version` and a short demo from it.

The first build downloads the locked wheels into .cache/bundle (gitignored); later builds, and
so this test on a machine that ran it before, need no network. Time on 2 busy cores, warm
cache: build ~3 s, install ~8 s, demo ~6 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from ..helpers import ROOT

pytestmark = pytest.mark.slow

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# Anything that tries the network goes to a closed port on loopback and fails at once, loudly.
DEAD = "http://127.0.0.1:9"
OFFLINE_ENV = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": f"{DEAD}/simple", "HTTP_PROXY": DEAD,
               "HTTPS_PROXY": DEAD, "http_proxy": DEAD, "https_proxy": DEAD, "ALL_PROXY": DEAD,
               "NO_PROXY": "", "no_proxy": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}  # fmt: skip


def build(out: Path, *args: str) -> Path:
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "bundle" / "build_bundle.py"),
                        "--out", str(out), *args],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    archive = Path(r.stdout.split()[0])
    assert archive.parent == out and archive.exists()
    return archive


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH (the repo must not leak in) and no release-backend variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ZERODOWN_BACKEND", "CONSUL_HTTP_ADDR",
                        "NOMAD_ADDR", "ZERODOWN_STATE_DIR", "ZERODOWN_ADMIN_LISTEN")}  # fmt: skip
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env.update(extra)
    return env


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (tree,) = into.iterdir()
    return tree


def install(tree: Path, prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(tree / "install.sh"), "--prefix", str(prefix), *args],
                          capture_output=True, text=True, timeout=300,
                          env=clean_env(**OFFLINE_ENV), cwd=prefix.parent)  # fmt: skip


def other_python() -> tuple[str, str] | None:
    """(interpreter, "3.N") of a CPython >= 3.11 other than this one, on PATH or from pyenv."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [shutil.which(f"python3.{n}") for n in range(11, 16)]
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(str(p) for p in Path(root).glob("versions/3.1[1-9]*/bin/python3"))
    for cand in filter(None, candidates):
        r = subprocess.run([cand, "-c", "import sys, venv, ensurepip; "
                            "print('%d.%d' % sys.version_info[:2], sys.implementation.name)"],
                           capture_output=True, text=True)  # fmt: skip
        found = r.stdout.split()
        if r.returncode == 0 and found[1] == "cpython" and found[0] != here:
            return cand, found[0]
    return None


def drop_wheel(tree: Path, name: str) -> None:
    """A bundle that lost one wheel but whose SHA256SUMS agrees: only pip can notice."""
    (wheel,) = (tree / "wheelhouse").glob(f"{name}-*.whl")
    wheel.unlink()
    sums = tree / "SHA256SUMS"
    sums.write_text("".join(line for line in sums.read_text().splitlines(keepends=True)
                            if wheel.name not in line))  # fmt: skip


def python_for_bundle() -> str:
    # install.sh looks for python3.X on PATH; the interpreter running the tests is one.
    return (
        shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}") or sys.executable
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("dist"))


def test_bundle_installs_offline_and_runs_version_and_a_demo(bundle, tmp_path):
    tree = unpack(bundle, tmp_path / "unpacked")
    prefix = tmp_path / "opt" / "zerodown"
    prefix.parent.mkdir()
    r = install(tree, prefix, "--python", python_for_bundle())
    assert r.returncode == 0, r.stdout + r.stderr
    zd = prefix / "bin" / "zerodown"
    assert (prefix / "current").resolve() == (prefix / "lib" / f"zerodown-{VERSION}").resolve()

    v = subprocess.run([str(zd), "--version"], capture_output=True, text=True, timeout=60,
                       env=clean_env(), cwd=tmp_path)  # fmt: skip
    assert v.returncode == 0, v.stderr
    assert v.stdout.splitlines()[0] == f"zerodown {VERSION}"
    # It runs from the prefix, not from this checkout.
    assert str(prefix / "lib" / f"zerodown-{VERSION}" / "bin" / "python") in v.stdout
    where = subprocess.run([str(prefix / "current" / "bin" / "python"), "-c",
                            "import orchestrator, zerodown_proxy; print(orchestrator.__file__)"],
                           capture_output=True, text=True, timeout=60, env=clean_env(),
                           cwd=tmp_path)  # fmt: skip
    assert Path(where.stdout.strip()).resolve().is_relative_to(prefix / "lib"), (
        where.stdout + where.stderr
    )

    demo = subprocess.run(
        [str(zd), "demo", "--seconds", "1", "--http-listen", "127.0.0.1:0",
         "--hsms-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=180, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "errors                   0" in demo.stdout
    assert "result: OK, zero downtime" in demo.stdout

    share = prefix / "current" / "share" / "zerodown"
    unit = (share / "systemd" / "zerodown-proxy.service").read_text()
    assert f"ExecStart={prefix}/bin/zerodown proxy --config /etc/zerodown/proxy.toml" in unit
    assert "@PREFIX@" not in unit
    assert (share / "nomad" / "drimeap.nomad.hcl").exists()
    assert (share / "examples" / "proxy.toml").exists()

    # A second install of the same version refuses (the running one is not pulled away) ...
    again = install(tree, prefix, "--python", python_for_bundle())
    assert again.returncode == 1 and "--force" in again.stderr
    # ... and a forced one that fails puts the installed version back as it was.
    drop_wheel(tree, "yarl")
    forced = install(tree, prefix, "--python", python_for_bundle(), "--force")
    assert forced.returncode == 1 and "left as it was" in forced.stderr
    v2 = subprocess.run([str(zd), "version"], capture_output=True, text=True, timeout=60,
                        env=clean_env(), cwd=tmp_path)  # fmt: skip
    assert v2.returncode == 0 and v2.stdout == v.stdout, v2.stderr
    assert not list((prefix / "lib").glob("*.replaced"))


def test_install_with_a_wheel_missing_fails_loudly_and_changes_nothing(bundle, tmp_path):
    """The control for the test above: with no index and the network refused, a missing wheel
    cannot come from anywhere, so pip must fail, and the prefix stays as it was."""
    tree = unpack(bundle, tmp_path / "unpacked")
    drop_wheel(tree, "yarl")
    prefix = tmp_path / "zerodown"
    prefix.mkdir()
    r = install(tree, prefix, "--python", python_for_bundle())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pip could not install the bundle's wheels" in r.stderr
    assert "yarl" in r.stderr
    assert not (prefix / "current").exists()
    assert list((prefix / "lib").iterdir()) == []  # the half-made venv is gone


def test_install_refuses_a_damaged_bundle_and_a_wrong_python(bundle, tmp_path):
    tree = unpack(bundle, tmp_path / "unpacked")
    prefix = tmp_path / "zerodown"
    prefix.mkdir()
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\necho 3.9\n")
    fake.chmod(0o755)
    r = install(tree, prefix, "--python", str(fake))
    assert r.returncode == 1
    assert f"Python 3.9, but this bundle's wheels are for Python {sys.version_info[0]}." in r.stderr

    (tree / "examples" / "proxy.toml").write_text("tampered\n")
    r = install(tree, prefix, "--python", python_for_bundle())
    assert r.returncode == 1 and "SHA256SUMS does not match" in r.stderr
    assert not (prefix / "current").exists()

    r = subprocess.run(["sh", str(tree / "install.sh")], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 2 and "--prefix DIR is required" in r.stderr


def test_bundle_is_reproducible_and_holds_only_the_locked_runtime_wheels(bundle, tmp_path):
    again = build(tmp_path / "again")
    assert again.name == bundle.name
    assert again.read_bytes() == bundle.read_bytes(), "same source and lock, different archive"

    tree = unpack(bundle, tmp_path / "unpacked")
    info = json.loads((tree / "BUILDINFO.json").read_text())
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert bundle.name.startswith(f"zerodown-bundle-{VERSION}-{tag}-")
    assert info["zerodown"] == VERSION and info["python_tag"] == tag and info["extras"] == []

    lock = (tree / "requirements.lock").read_text()
    wheels = sorted((tree / "wheelhouse").iterdir())
    for w in wheels:  # every file is a locked one (pip checked it; this says it again)
        assert hashlib.sha256(w.read_bytes()).hexdigest() in lock, w.name
    names = {w.name.split("-")[0].lower() for w in wheels}
    for dev_only in ("pytest", "hypothesis", "matplotlib", "numpy", "psutil", "ruff", "py_spy"):
        assert dev_only not in names
    assert {"aiohttp", "uvloop", "httptools", "orjson", "secsgem", "zerodown"} <= names
    assert not {"python_consul2", "python_nomad", "requests"} & names

    (zwheel,) = (tree / "wheelhouse").glob("zerodown-*.whl")
    with zipfile.ZipFile(zwheel) as z:
        names_in_wheel = set(z.namelist())
    tops = {n.split("/")[0] for n in names_in_wheel}
    assert "benchmarks" not in tops and "tests" not in tops
    assert {"zerodown_proxy", "orchestrator"} <= tops
    static = "zerodown_proxy/dashboard/static/"  # the web dashboard ships as package data
    assets = ("index.html", "dashboard.js", "charts.js", "dashboard.css")
    assert {static + f for f in assets} <= names_in_wheel


def test_a_bundle_for_another_python_installs_and_imports_there(tmp_path):
    """--python-version / --platform: wheels for a Python this build does not run on."""
    other = other_python()
    if other is None:
        pytest.skip("no second CPython >= 3.11 (PATH or pyenv) to install a cross-target bundle")
    python, version = other
    arch = os.uname().machine
    archive = build(tmp_path / "dist", "--python-version", version,
                    "--platform", f"manylinux_2_17_{arch}")  # fmt: skip
    tag = "cp" + version.replace(".", "")
    assert archive.name == f"zerodown-bundle-{VERSION}-{tag}-linux_{arch}.tar.gz"
    tree = unpack(archive, tmp_path / "unpacked")
    assert all(tag in w.name or "-none-any" in w.name for w in (tree / "wheelhouse").iterdir())
    prefix = tmp_path / "zerodown"
    r = install(tree, prefix, "--python", python)
    assert r.returncode == 0, r.stdout + r.stderr
    # The compiled wheels load on that interpreter, and so does the proxy's server module.
    imp = subprocess.run([str(prefix / "current" / "bin" / "python"), "-c",
                          "import uvloop, httptools, orjson, aiohttp, secsgem, "
                          "zerodown_proxy.server, orchestrator.cli; import sys; "
                          "print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60, env=clean_env(),
                         cwd=tmp_path)  # fmt: skip
    assert imp.returncode == 0 and imp.stdout.strip() == version, imp.stdout + imp.stderr
