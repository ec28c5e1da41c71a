# Two commands on a fresh machine:
#   make demo   builds a small Llama from a config, parallelizes it over 2 ranks with torchrun,
#               prints per-rank parity against the unsharded model and per-rank weight bytes
#   make test   runs the test suite
# Both create .venv and install autotp with torch pinned to 2.13.0 (constraints.txt).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,fast,bench]"
	# compile DeepSpeed's shared-memory all-reduce now rather than in the first parallelize (~25 s)
	$(BIN)/python -c "from autotp.fast_allreduce import prebuild_fast_path; print('fast all-reduce built:', prebuild_fast_path())"
	touch $@

demo: venv
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node 2 examples/parallelize_llama.py

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
