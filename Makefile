# Every target creates the virtualenv itself: a fresh clone needs only `make demo` / `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The venv installs exactly the locked files (pip checks every hash); `make lock` re-resolves.
LOCKS := requirements-build.lock requirements.lock requirements-dev.lock

.PHONY: venv demo test lint bench sysdeps browser clean bundle lock lock-upgrade node-peers

$(STAMP): pyproject.toml $(LOCKS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements-build.lock
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/zerodown demo

# sysdeps: the benchmark smoke tests need nginx, wrk and valgrind; browser: the dashboard test
# needs Chromium; node-peers: the second HSMS peer, secs4js (each apt-get only if something is missing).
test: $(STAMP) sysdeps browser node-peers
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# The second HSMS implementation the integration tests use (secs4js, tests/peers/secs4js):
# `npm ci` from the committed package-lock.json; Debian's nodejs + npm only if node is missing.
PEERS := tests/peers/secs4js
$(PEERS)/node_modules/.installed: $(PEERS)/package.json $(PEERS)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	cd $(PEERS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-peers: $(PEERS)/node_modules/.installed

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian packages used by the benchmarks (nginx, wrk, h2load) as the side-by-side reference,
# valgrind for `zerodown bench instructions` (callgrind) and taskset (util-linux) for pinning.
sysdeps:
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v h2load >/dev/null \
	  && command -v valgrind >/dev/null && command -v taskset >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk \
	    nghttp2-client valgrind util-linux)

# Headless Chromium and its WebDriver for the dashboard's browser test (Debian packages); the
# test skips, saying why, only when they cannot be installed here.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
	  echo "warning: could not install chromium and chromium-driver: the browser tests will skip"

bench: $(STAMP) sysdeps
	$(BIN)/zerodown bench all

# Offline install for closed networks: dist/zerodown-bundle-<version>-<python>-<platform>.tar.gz
# (README, "Offline install"). Needs only $(PY) and the package index, not the dev venv.
# BUNDLE_ARGS: --dev (test and bench extras too), --python-version X.Y --platform TAG (another
# target than $(PY) on this machine), --out DIR.
bundle:
	$(PY) deploy/bundle/build_bundle.py $(BUNDLE_ARGS)

# Lock files with hashes, resolved against the package index only (no local pip configuration,
# find-links or extra index), with a pinned pip-tools in its own venv. `make lock` keeps
# existing pins and adds what pyproject.toml asks for; `make lock-upgrade` moves every pin to
# the newest release its range allows.
LOCK_TOOLS := pip==26.3 pip-tools==7.6.2
LOCK_VENV := .cache/lock-tools
COMPILE = env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
	$(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

lock:
	test -x $(LOCK_VENV)/bin/pip-compile || $(PY) -m venv $(LOCK_VENV)
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/pip install -q $(LOCK_TOOLS)
	$(COMPILE) -o requirements-build.lock requirements-build.in
	$(COMPILE) -o requirements.lock pyproject.toml
	$(COMPILE) --extra test --extra bench -c requirements.lock -o requirements-dev.lock pyproject.toml

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(PEERS)/node_modules
