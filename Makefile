# pacsflow — one command to set up and run the demo, one to set up and run the tests.
#   make demo    creates .venv, installs pacsflow, runs `pacsflow demo`
#   make test    creates .venv, installs pacsflow[dev], Orthanc, Chromium, dcm2niix and Tesseract,
#                runs the whole test suite
#   make test-data  fetches the real DICOM corpus the real-data tests use into a cache
#                (~/.cache/pacsflow-test-data or $PACSFLOW_TEST_DATA), checking every sha256;
#                where ../shared/data exists it is used as is. VERIFY=1 hashes that too.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch: a CPU wheel of 2.13.0 is on disk on the project's machines; pinning it first keeps pip
# from pulling a multi-GB CUDA build. On a GPU server set TORCH_SPEC to a CUDA build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: demo test test-data setup setup-dev orthanc chromium imaging-tools lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pacsflow needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); \
	  else echo "python venv is missing: sudo apt-get install python3-venv"; exit 1; fi; }
	$(BIN)/python -m pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/pacsflow demo --out $(DEMO_OUT)

orthanc:
	bash tools/install-orthanc.sh

chromium:
	bash tools/install-chromium.sh

imaging-tools:
	bash tools/install-imaging-tools.sh

test: setup orthanc chromium imaging-tools
	bash tools/run-tests.sh $(PYTEST_ARGS)

test-data: setup
	$(BIN)/python tools/fetch_test_data.py $(if $(VERIFY),--verify)

lint: setup
	$(BIN)/ruff check pipeline tests tools bench
	$(BIN)/ruff format --check pipeline tests tools bench
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
