# The two commands of the README. Both create .venv and install what they need.
#   make demo   train the tiny CPU config on the procedural scenes, sample, evaluate
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/tiny_cpu
DATA_DIR ?= workdir/tensorflow_datasets
CONFIG ?= configs/tiny_cpu.py
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mmgen_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --mode=all \
		--config.data.data_dir=$(DATA_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdir .pytest_cache
