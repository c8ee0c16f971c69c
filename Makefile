# Two commands on a fresh machine: `make demo` and `make test`. Both set up the venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test lint demo bench bench-step bench-gpu lock clean

setup: $(STAMP)

# Re-runs only when the pins change; otherwise `make setup` is a no-op.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check pcm tests benchmarks components pipelines

demo: setup
	@echo "make demo: the demo pipeline (shapes world -> tiny teacher -> PCM distillation -> evaluation ->"
	@echo "registry) is not built yet; see issue 'Pipelines: dvc repro, make demo, and Kubeflow'." >&2
	@exit 1

bench: setup
	$(PY) benchmarks/toy_gmm.py

bench-step: setup
	$(PY) benchmarks/train_step.py

# SDXL-size UNet on a GPU (bf16, gradient checkpointing, LoRA rank 64, batch 10); says so and exits 0 without CUDA.
bench-gpu: setup
	$(PY) benchmarks/sdxl_gpu.py

# Regenerates requirements.lock from pyproject.toml in a throwaway venv.
lock:
	rm -rf /tmp/pcm-lock-venv && $(PYTHON) -m venv /tmp/pcm-lock-venv
	/tmp/pcm-lock-venv/bin/pip install --quiet -e '.[dev]'
	( echo "# Exact versions of every package (make lock regenerates it). torch is the CPU wheel here, the CUDA one on GPU hosts."; \
	  /tmp/pcm-lock-venv/bin/pip freeze --all | grep -vE '^(-e |pcm-pipelines|pip==|wheel==)' | sed 's/+cpu//' | sort -f ) > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
