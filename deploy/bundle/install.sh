#!/bin/sh
# Installs zerodown @VERSION@ from this bundle (@BUNDLE@) on a host with no network.
#
#   sh install.sh --prefix /opt/zerodown [--python /usr/bin/python@PYTHON_VERSION@] [--systemd DIR] [--force]
#
# Creates PREFIX/lib/zerodown-@VERSION@ (a venv holding exactly the locked wheels of wheelhouse/,
# every hash checked by pip), points PREFIX/current at it and PREFIX/bin/zerodown at
# current/bin/zerodown. Earlier versions stay in PREFIX/lib, so going back is one symlink (see
# INSTALL.md). Nothing is downloaded: pip runs with --no-index and ignores every pip
# configuration file and PIP_* variable of this host. A failed install removes what it created
# and leaves PREFIX/current as it was.
# (deploy/bundle/install.sh in the zerodown repository is the template; build_bundle.py fills in the
# @...@ values.)
set -eu

VERSION="@VERSION@"
PYTHON_VERSION="@PYTHON_VERSION@"
PLATFORM="@PLATFORM@"
EXTRAS="@EXTRAS@"

die() { echo "install.sh: $*" >&2; exit 1; }
usage() {
    echo "usage: sh install.sh --prefix DIR [--python PATH] [--systemd DIR] [--force]"
    echo "Installs zerodown $VERSION for Python $PYTHON_VERSION on $PLATFORM; see INSTALL.md."
}

prefix=""
python="python$PYTHON_VERSION"
systemd_dir=""
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python=$2; shift 2 ;;
        --python=*) python=${1#--python=}; shift ;;
        --systemd) [ $# -ge 2 ] || die "--systemd needs a directory"; systemd_dir=$2; shift 2 ;;
        --systemd=*) systemd_dir=${1#--systemd=}; shift ;;
        --force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; echo "install.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -n "$prefix" ] || { usage >&2; echo "install.sh: --prefix DIR is required" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
command -v "$python" >/dev/null 2>&1 \
    || die "no $python on this host: this bundle's wheels are for Python $PYTHON_VERSION; pass --python PATH"
found=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || die "$python does not run"
[ "$found" = "$PYTHON_VERSION" ] \
    || die "$python is Python $found, but this bundle's wheels are for Python $PYTHON_VERSION; pass --python PATH (or build a bundle for $found)"
"$python" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$python has no venv/ensurepip module (Debian/Ubuntu: install python$PYTHON_VERSION-venv)"

# The bundle arrived whole (pip checks the wheels again against requirements.lock).
if command -v sha256sum >/dev/null 2>&1; then
    sums=$(cd "$here" && sha256sum -c SHA256SUMS 2>&1) \
        || die "SHA256SUMS does not match the files of $here: the bundle is damaged or was changed ($(echo "$sums" | grep -v ': OK$' | head -3 | tr '\n' ' '))"
fi

mkdir -p "$prefix/lib" "$prefix/bin"
prefix=$(cd "$prefix" && pwd)
if [ -e "$prefix/bin/zerodown" ] && [ ! -L "$prefix/bin/zerodown" ]; then
    die "$prefix/bin/zerodown exists and is not this installer's symlink; move it away first"
fi
dest="$prefix/lib/zerodown-$VERSION"
created=""
replaced=""
# On any failure: remove what this run made, put back what --force moved aside.
cleanup() {
    [ -z "$created" ] || rm -rf "$created"
    [ -z "$replaced" ] || mv -T "$replaced" "$dest"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ -e "$dest" ]; then
    [ "$force" = 1 ] || die "$dest exists (zerodown $VERSION is installed); --force reinstalls it"
    rm -rf "$dest.replaced"
    mv -T "$dest" "$dest.replaced"
    replaced="$dest.replaced"
fi

# Only the bundle: no index, no host pip configuration or variables, no cache.
for var in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$var"; done
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1

created=$dest
"$python" -m venv "$dest"
"$dest/bin/python" -m pip install --quiet --no-index --find-links "$here/wheelhouse" \
    --only-binary=:all: --require-hashes -r "$here/requirements.lock" \
    || die "pip could not install the bundle's wheels into $dest ($prefix is left as it was)"
"$dest/bin/zerodown" --version >/dev/null \
    || die "$dest/bin/zerodown --version failed after the install ($prefix is left as it was)"

share="$dest/share/zerodown"
mkdir -p "$share/systemd"
cp -R "$here/examples" "$here/nomad" "$share/"
cp "$here/INSTALL.md" "$here/BUILDINFO.json" "$here/requirements.lock" "$share/"
for unit in "$here"/systemd/*; do
    sed "s|@PREFIX@|$prefix|g" "$unit" > "$share/systemd/$(basename "$unit")"
done
created=""
if [ -n "$replaced" ]; then
    rm -rf "$replaced"
    replaced=""
fi

# Switch current to the new version in one rename, so PREFIX/bin/zerodown is never missing.
rm -f "$prefix/.current.new"
ln -s "lib/zerodown-$VERSION" "$prefix/.current.new"
mv -T "$prefix/.current.new" "$prefix/current"
[ -L "$prefix/bin/zerodown" ] || ln -s ../current/bin/zerodown "$prefix/bin/zerodown"

if [ -n "$systemd_dir" ]; then
    mkdir -p "$systemd_dir"
    cp "$share"/systemd/*.service "$systemd_dir/"
    echo "unit files copied to $systemd_dir: run systemctl daemon-reload"
fi

echo "installed zerodown $VERSION${EXTRAS:+ [$EXTRAS]} in $dest"
echo "  $prefix/bin/zerodown -> current/bin/zerodown; examples, Nomad jobs and systemd units in $share"
"$prefix/bin/zerodown" --version | sed 's/^/  /'
