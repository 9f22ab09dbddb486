# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ibllm-installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_AUTH_MODE ?= disabled
export NO_ALBUMENTATIONS_UPDATE ?= 1

.PHONY: venv demo test test-fast browser lint format bench clean

venv: $(STAMP)

# torch first, pinned: a bare `torch` (or peft alone) would pull the newest CUDA build with several GB of wheels.
# constraints.txt is the tested set of every package; pyproject.toml holds the caps that matter and why.
# img2dataset installs the `dataclasses` backport, which breaks Prefect's server: remove it afterwards.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,apps]'
	$(BIN)/pip uninstall --quiet --yes dataclasses
	touch $(STAMP)

demo: venv
	$(BIN)/ibllm demo

test: venv browser
	$(BIN)/pytest

# The chat page's test drives a real headless Chromium: install Debian's where apt can (root); else it is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the chat page's browser test"; \
		apt-get install -y -qq chromium chromium-driver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "no chromium and no root apt: the chat page's browser test will be skipped"; fi

test-fast: venv
	$(BIN)/pytest -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) workspace .prefect .pytest_cache .ruff_cache
