# Two entry points; each creates or updates the virtual environment first.
#   make book   run every notebook with papermill (embedded default) and render _build/html
#   make test   run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= default
RUN    ?= runs/$(basename $(notdir $(PROFILE)))

.PHONY: book test venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(BIN)/python -m skinlib.run --profile $(PROFILE) --out $(RUN)
	$(BIN)/python -m skinlib.book --run $(RUN)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
