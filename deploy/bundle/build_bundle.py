"""`make bundle`: one archive with everything a host without network needs to install zerodown.

dist/zerodown-bundle-<version>-<python tag>-<platform>.tar.gz unpacks to one directory holding
  wheelhouse/        zerodown's wheel and every runtime dependency's, for one Python and platform
  requirements.lock  the hash-locked requirements plus zerodown's own wheel and its hash
  install.sh         `install.sh --prefix DIR`: a venv in DIR/lib/zerodown-<version>, DIR/bin/zerodown
  INSTALL.md, Dockerfile, nomad/ (job files), examples/ (proxy config), systemd/ (unit files),
  BUILDINFO.json (what was built from what), SHA256SUMS (every other file)

Reproducible: the wheels are exactly the locked files (pip checks every hash); zerodown's wheel
is built by the locked pip/setuptools/wheel (requirements-build.lock) with SOURCE_DATE_EPOCH; the
archive has sorted entries and fixed times, owners and modes. The same tree, locks and target
give the same archive, byte for byte.

Downloads are kept in .cache/bundle/wheels and looked for there first with no index, so a
rebuild (and the test that builds a bundle) needs no network once they are there. The package
index is PyPI or $PIP_INDEX_URL; pip configuration files, find-links and extra indexes of the
building machine are ignored, so what a bundle holds does not depend on them.

Runs on the standard library alone (no dev venv needed): `python3 deploy/bundle/build_bundle.py -h`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "bundle"
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"  # runtime + test + bench extras
BUILD_LOCK = ROOT / "requirements-build.lock"
DEV_EXTRAS = ("bench", "test")
DEV_ONLY_PACKAGES = ("benchmarks",)  # in the dev venv and a --dev bundle, not in production
FALLBACK_EPOCH = 315532800  # 1980-01-01, the earliest time a zip (wheel) entry can carry
# Environment that would let the building machine's pip setup change what is downloaded.
PIP_ENV_DROPPED = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT",
                   "PIP_REQUIREMENT", "PIP_ONLY_BINARY", "PIP_NO_BINARY", "PIP_PREFER_BINARY",
                   "PIP_PLATFORM", "PIP_PYTHON_VERSION", "PIP_IMPLEMENTATION", "PIP_ABI")  # fmt: skip


class BuildError(Exception):
    """A step that failed, said in one sentence (plus the tool's own output where it helps)."""


@dataclass(frozen=True, slots=True)
class Target:
    """The Python and platform the bundle's wheels are for."""

    python_version: str  # "3.11"
    platforms: tuple[str, ...]  # pip --platform tags; () = this machine's
    native: bool  # the Python running the build, on this machine: no cross-target flags

    @property
    def python_tag(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    @property
    def platform_name(self) -> str:
        """linux_x86_64 for this machine and for manylinux_2_17_x86_64 / manylinux2014_x86_64."""
        if not self.platforms:
            return re.sub(r"[-.]", "_", sysconfig.get_platform())
        m = re.match(r"^(manylinux|musllinux)(?:\d+|_\d+_\d+)_(.+)$", self.platforms[0])
        if m:
            return ("linux_" if m[1] == "manylinux" else "musllinux_") + m[2]
        return self.platforms[0]

    def pip_args(self) -> list[str]:
        args = ["--only-binary=:all:"]  # wheels only: the target host has no compiler to rely on
        if not self.native:
            args += ["--python-version", self.python_version, "--implementation", "cp"]
            for tag in expand_platforms(self.platforms):
                args += ["--platform", tag]
        return args


def expand_platforms(tags: tuple[str, ...]) -> list[str]:
    """What a host of each tag's glibc accepts, as pip on that host would: manylinux_2_28_x86_64
    also takes manylinux_2_27 ... manylinux_2_5 and the legacy manylinux2014/2010/1 names
    (PEP 600). pip does not do this for --platform, and many wheels carry only older tags."""
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    out: list[str] = []
    for tag in tags:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
        if not m:
            out.append(tag)
            continue
        glibc, arch = int(m[1]), m[2]
        for minor in range(glibc, 4, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            if minor in legacy:
                out.append(f"{legacy[minor]}_{arch}")
    return list(dict.fromkeys(out))


def make_target(python_version: str | None, platforms: list[str]) -> Target:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    wanted = python_version or here
    if not re.fullmatch(r"3\.\d+", wanted):
        raise BuildError(f"--python-version must look like 3.11, not {wanted!r}")
    return Target(wanted, tuple(platforms), native=wanted == here and not platforms)


# -- running pip ------------------------------------------------------------------------------


def pip_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PIP_ENV_DROPPED}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra or {})
    return env


def run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env or pip_env(), cwd=cwd)
    if check and p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return p


def fetch(pip: list[str], lock: Path, target: Target, dest: Path, cache: Path) -> None:
    """Put exactly the locked wheels for `target` into `dest`: from the cache alone when it
    holds them all, else from the index (new downloads are kept in the cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [*pip, "download", "-q", "--require-hashes", "-r", str(lock), "-d", str(dest),
           "--find-links", str(cache), *target.pip_args()]  # fmt: skip
    if run([*cmd, "--no-index"], "offline download", check=False).returncode != 0:
        run(cmd, f"downloading the wheels of {lock.name} for {target.python_tag} "
                 f"{target.platform_name} (the index is unreachable, or a locked version has "
                 "no wheel for this target)")  # fmt: skip
    for f in dest.iterdir():
        if f.suffix == ".whl" and not (cache / f.name).exists():
            shutil.copyfile(f, cache / f.name)


def build_python(cache: Path) -> Path:
    """A venv with the locked build tools (pip, setuptools, wheel), kept while the lock is
    unchanged. Runs on this machine, so it is made with the Python running this script."""
    key = hashlib.sha256(BUILD_LOCK.read_bytes()).hexdigest()[:16]
    venv = cache / f"build-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], "creating the build venv")
    with tempfile.TemporaryDirectory() as tmp:
        here = Target(f"{sys.version_info.major}.{sys.version_info.minor}", (), native=True)
        fetch([str(python), "-m", "pip"], BUILD_LOCK, here, Path(tmp), cache / "wheels")
        run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", tmp,
             "--require-hashes", "-r", str(BUILD_LOCK)], "installing the build tools")  # fmt: skip
    (venv / ".complete").touch()
    return python


# -- the source -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    version: str
    packages: tuple[str, ...]  # top-level package directories the wheel is built from
    commit: str | None
    dirty: bool
    epoch: int  # SOURCE_DATE_EPOCH: every time stamp in the wheel and the archive


def read_source(dev: bool) -> Source:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    # Top-level packages the wheel declares (pyproject's own list), minus dev-only ones.
    tops = sorted({pat.split(".")[0].rstrip("*") for pat in include})
    packages = tuple(p for p in tops if dev or p not in DEV_ONLY_PACKAGES)
    commit, dirty, commit_time = _git_state(["pyproject.toml", "README.md", *packages])
    env_epoch = os.environ.get("SOURCE_DATE_EPOCH")
    epoch = int(env_epoch) if env_epoch else commit_time or FALLBACK_EPOCH
    return Source(meta["project"]["version"], packages, commit, dirty, epoch)


def _git_state(paths: list[str]) -> tuple[str | None, bool, int | None]:
    """(HEAD commit, whether `paths` differ from it, commit time); Nones outside git."""
    if not shutil.which("git") or not (ROOT / ".git").exists():
        return None, False, None
    head = run(["git", "-C", str(ROOT), "log", "-1", "--format=%H %ct"], "git log", check=False)
    if head.returncode != 0 or not head.stdout.strip():
        return None, False, None
    commit, ct = head.stdout.split()
    status = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths], "git status")
    return commit, bool(status.stdout.strip()), int(ct)


def build_wheel(python: Path, src: Source, out: Path) -> Path:
    """zerodown's wheel, built from a copy of exactly the files it ships: no stale build/ dir,
    no __pycache__, modes normalised, so the same source gives the same bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "zerodown"
        stage.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copyfile(ROOT / name, stage / name)
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for pkg in src.packages:
            shutil.copytree(ROOT / pkg, stage / pkg, ignore=skip, copy_function=shutil.copyfile)
        for path in stage.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = pip_env({"SOURCE_DATE_EPOCH": str(src.epoch)})
        run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", str(out), str(stage)], "building zerodown's wheel", env=env)  # fmt: skip
    wheels = sorted(out.glob("zerodown-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one zerodown wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


# -- the bundle -------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


INSTALL_TIME = {"@PREFIX@"}  # filled in by install.sh on the target host


def render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = set(re.findall(r"@[A-Z_]+@", text)) - INSTALL_TIME
    if left:
        raise BuildError(f"template placeholders left unfilled: {sorted(set(left))}")
    return text


def bundle_lock(lock: Path, wheel: Path, src: Source, dev: bool) -> str:
    name = f"zerodown[{','.join(DEV_EXTRAS)}]" if dev else "zerodown"
    built = "a source tree outside git"
    if src.commit:
        built = f"commit {src.commit[:12]}" + (" with local changes" if src.dirty else "")
    return (
        lock.read_text().rstrip("\n")
        + f"\n\n# zerodown itself: {wheel.name}, built from {built} by deploy/bundle/build_bundle.py\n"
        + f"{name}=={src.version} \\\n    --hash=sha256:{sha256(wheel)}\n"
    )  # fmt: skip


def assemble(tree: Path, src: Source, target: Target, dev: bool, cache: Path) -> None:
    python = build_python(cache)
    wheelhouse = tree / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    lock = DEV_LOCK if dev else RUNTIME_LOCK
    fetch([str(python), "-m", "pip"], lock, target, wheelhouse, cache / "wheels")
    wheel = build_wheel(python, src, wheelhouse)
    (tree / "requirements.lock").write_text(bundle_lock(lock, wheel, src, dev))

    values = {
        "VERSION": src.version,
        "PYTHON_VERSION": target.python_version,
        "PYTHON_TAG": target.python_tag,
        "PLATFORM": target.platform_name,
        "BUNDLE": tree.name,
        "EXTRAS": ",".join(DEV_EXTRAS) if dev else "",
    }
    install = tree / "install.sh"
    install.write_text(render((HERE / "install.sh").read_text(), values))
    (tree / "INSTALL.md").write_text(render((HERE / "INSTALL.md").read_text(), values))
    shutil.copyfile(ROOT / "Dockerfile", tree / "Dockerfile")
    for sub, source in (("nomad", ROOT / "deploy" / "nomad"), ("examples", ROOT / "examples"),
                        ("systemd", ROOT / "deploy" / "systemd")):  # fmt: skip
        (tree / sub).mkdir()
        for f in sorted(source.iterdir()):
            if f.is_file():
                shutil.copyfile(f, tree / sub / f.name)

    info = {
        "schema": "zerodown.bundle/v1",
        "zerodown": src.version,
        "python": target.python_version,
        "python_tag": target.python_tag,
        "platform": target.platform_name,
        "pip_platforms": list(target.platforms) or None,
        "extras": list(DEV_EXTRAS) if dev else [],
        "source_commit": src.commit,
        "source_dirty": src.dirty,
        "source_date_epoch": src.epoch,
        "wheels": sorted(w.name for w in wheelhouse.iterdir()),
    }
    (tree / "BUILDINFO.json").write_text(json.dumps(info, indent=2) + "\n")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    sums = "".join(f"{sha256(p)}  {p.relative_to(tree).as_posix()}\n" for p in files)
    (tree / "SHA256SUMS").write_text(sums)


def write_archive(tree: Path, out: Path, epoch: int) -> None:
    """A tar.gz whose bytes depend on the files' contents only."""
    executable = {"install.sh"}
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in [tree, *sorted(tree.rglob("*"))]:
                arcname = (Path(tree.name) / path.relative_to(tree)).as_posix()
                info = tarfile.TarInfo(arcname)
                info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
                if path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    continue
                data = path.read_bytes()
                info.size = len(data)
                info.mode = 0o755 if path.name in executable else 0o644
                tar.addfile(info, io.BytesIO(data))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(raw.getvalue())
    os.replace(tmp, out)


def build(out_dir: Path, cache: Path, target: Target, dev: bool) -> Path:
    src = read_source(dev)
    name = f"zerodown-bundle-{src.version}-{target.python_tag}-{target.platform_name}"
    name += "-dev" if dev else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / name
        assemble(tree, src, target, dev, cache.resolve())
        archive = out_dir / f"{name}.tar.gz"
        write_archive(tree, archive, src.epoch)
    return archive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_bundle.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "dist"), help="where the archive goes (./dist)")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "bundle"),
                   help="downloaded wheels and the build venv (./.cache/bundle)")  # fmt: skip
    p.add_argument("--dev", action="store_true",
                   help="also the test and bench extras and the benchmarks package")  # fmt: skip
    p.add_argument("--python-version", default=None,
                   help="target Python X.Y (default: the Python running this script)")  # fmt: skip
    p.add_argument("--platform", action="append", default=[], metavar="TAG",
                   help="target pip platform tag, e.g. manylinux_2_17_x86_64 (repeatable; "
                        "default: this machine)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        target = make_target(args.python_version, args.platform)
        archive = build(Path(args.out), Path(args.cache), target, args.dev)
    except BuildError as exc:
        print(f"build_bundle: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"{archive}  sha256 {sha256(archive)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
