# Two entry points: `make up` (local stack on the embedded default) and `make test`.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOOLS  := $(VENV)/.test-tools

.PHONY: up test unit install clean

up: $(STAMP)
	$(BIN)/moestack up

test: $(STAMP) $(TOOLS)
	./scripts/run-tests.sh

unit: $(STAMP) $(TOOLS)
	./scripts/run-tests.sh tests/unit

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	./scripts/install.sh $(VENV)
	touch $(STAMP)

$(TOOLS): $(STAMP) scripts/install-test-tools.sh scripts/install-helm.sh
	./scripts/install-test-tools.sh $(VENV)
	touch $(TOOLS)

clean:
	rm -rf $(VENV)
