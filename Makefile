# Every target creates the virtualenv itself: a fresh clone needs only `make demo` / `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench sysdeps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/zerodown demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian packages used by the benchmarks (nginx, wrk, h2load) as the side-by-side reference.
sysdeps:
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v h2load >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk nghttp2-client)

bench: $(STAMP) sysdeps
	$(BIN)/zerodown bench all

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
