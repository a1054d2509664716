# Two entry points: `make up` (local stack on the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test unit install clean

up: $(STAMP)
	$(BIN)/moestack up

test: $(STAMP)
	./scripts/run-tests.sh

unit: $(STAMP)
	./scripts/run-tests.sh tests/unit

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	./scripts/install.sh $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV)
