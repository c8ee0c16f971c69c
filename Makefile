# Two commands on a fresh machine: `make demo` and `make test`. Both set up the venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo demo-video demo-sd3 screenshots bench bench-step bench-reference bench-gpu bench-checkpoint bench-claims bench-loader gpu-check lock clean

setup: $(STAMP)

# Re-runs only when the pins change; otherwise `make setup` is a no-op. uv (pinned in requirements.lock) installs the
# same exact pins as pip several times faster; where uv cannot be had, pip does it. Then the bytecode of what the
# stages, launchers and tests import is written by importing it, in two processes (one per core): about 20 s on
# 2 cores, where compiling all 22,000 installed modules (--compile-bytecode) took 42 s. Without bytecode every process
# would recompile torch, diffusers and transformers on import (12 s of CPU instead of 5 for each `pcm` process), which
# is what happens where PYTHONDONTWRITEBYTECODE is set (this Makefile unsets it for its commands, so whatever the
# warm-up missed is written once, at its first import).
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	( $(PY) -m pip install -qq --disable-pip-version-check "$$(grep -E '^uv==' requirements.lock)" && \
	  $(VENV)/bin/uv pip install -q --python $(PY) --index-strategy unsafe-best-match \
		$$($(PY) -c "$$PIP_SOURCES") -r requirements.lock ) || \
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "$$WARM_PCM" & warm=$$!; $(PY) -c "$$WARM_LAUNCHERS" && wait $$warm
	touch $(STAMP)

unexport PYTHONDONTWRITEBYTECODE

# Every module of pcm (and so the torch, diffusers, transformers, peft and mlflow parts it uses) ...
define WARM_PCM
import importlib, pkgutil, pcm
for module in pkgutil.walk_packages(pcm.__path__, "pcm."):
    importlib.import_module(module.name)
endef
export WARM_PCM

# ... and what the launchers and the tests run in processes of their own.
define WARM_LAUNCHERS
import importlib
for name in ["mlflow.server", "mlflow.pyfunc.scoring_server", "mlflow.cli", "dvc.cli", "dvc.repo.reproduce",
             "kfp.local", "kfp.compiler", "kfp.dsl.executor_main", "accelerate.commands.launch", "pytest",
             "xdist.plugin", "hypothesis", "webdataset", "uvicorn"]:
    importlib.import_module(name)
endef
export WARM_LAUNCHERS

# pip's package sources (pip.conf, PIP_* variables) as uv flags: uv reads neither, and a machine may keep its torch
# build there (this one: the CPU wheel in a find-links folder). Like pip, uv then takes the best match of each pin
# over PyPI and those sources (--index-strategy unsafe-best-match).
define PIP_SOURCES
import re, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "constraint": "--constraints", "cert": "--cert"}
found = re.findall(r"^[^.\n]*\.([a-z-]+)='(.*)'$$", listed, re.M)
print(" ".join(dict.fromkeys(f"{flags[k]} {v}" for k, vs in found if k in flags for v in vs.split())))
endef
export PIP_SOURCES

# Two pytest-xdist workers, one per core, each taking whole test modules (a module's fixtures are built once), the
# longest modules first (tests/conftest.py orders them); TEST_WORKERS=1 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The first line says how fast this machine is and how long the suite should take on it (benchmarks/machine_speed.py).
test: setup
	@$(PY) benchmarks/machine_speed.py expect test
	$(PY) -m pytest $(XDIST) --durations=15 $(PYTEST_ARGS)

# The suite minus the tests marked slow (end to end, more than a few seconds each): under 3 minutes on 2 cores.
# `make test` runs every test and stays the CI command.
test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check pcm tests benchmarks components pipelines

# The whole demo pipeline through DVC (dvc.yaml): shapes -> prepare -> demo teacher -> 4 distillations -> evaluation
# -> MLflow registry. A second run with nothing changed only checks hashes. QUICK=1: the same stages with the small
# budgets of configs/quick.yaml, in a copy of the repo under .demo-quick/ (the real demo's outputs stay untouched).
# pipelines/dvc_repro.py is `dvc repro` with the stages that do not depend on each other (the distillations) run side by side,
# DEMO_JOBS at a time on their share of the cores (auto: one per core; DEMO_JOBS=1 is plain `dvc repro`).
DEMO_DIR := $(if $(filter 1,$(QUICK)),.demo-quick,.)
DEMO_JOBS ?= auto
REPRO = pipelines/dvc_repro.py --jobs $(DEMO_JOBS)
demo: setup
ifeq ($(QUICK),1)
	rm -rf .demo-quick && mkdir -p .demo-quick
	git ls-files -z | xargs -0 cp --parents -t .demo-quick
	cp configs/quick.yaml .demo-quick/params.yaml
	cd .demo-quick && git init -q
endif
	cd $(DEMO_DIR) && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(CURDIR)/$(PY) $(CURDIR)/benchmarks/machine_speed.py \
		run $(if $(filter 1,$(QUICK)),demo-quick,demo) -- $(CURDIR)/$(PY) $(CURDIR)/$(REPRO)
	@echo; cat $(DEMO_DIR)/reports/eval/steps.md; echo
	@echo "report (open in a browser):  $(DEMO_DIR)/reports/eval/report.html"
	@echo "sample grids and plots:      $(DEMO_DIR)/reports/eval/grids/ $(DEMO_DIR)/reports/eval/plots/"
	@echo "registered model:            $$(cat $(DEMO_DIR)/models/registered.json | tr -d '\n ')"
	@echo "browse the MLflow runs:      cd $(DEMO_DIR) && $(CURDIR)/$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db"

# The video demo through DVC (video/dvc.yaml, params configs/video-demo.yaml): moving-shapes clips -> the video
# teacher (motion modules on the image demo's teacher, which `make demo` makes and this reuses, or makes first) ->
# PCM M = 1, 2, 4 and LCM -> the step table at 1/2/4/8 steps beside the teacher's DDIM, with the motion oracle -> the
# registry. A second run with nothing changed only checks hashes.
demo-video: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/machine_speed.py run demo-video -- \
		$(PY) $(REPRO) video/dvc.yaml
	@echo; echo "the video teacher's own DDIM + CFG on held-out captions, read by the motion oracle:"
	@grep -E '^  "(main_colour_acc|motion_acc)"' models/demo-video-teacher/metrics.json
	@echo; cat reports/video-eval/steps.md; echo
	@echo "report with animated grids:  reports/video-eval/report.html"
	@echo "registered model:            $$(cat models/video-registered.json | tr -d '\n ')"

# What a person sees, as PNGs in docs/ (not part of make test or CI; needs chromium: apt-get install -y chromium): the
# report of `make demo` (QUICK=1: of .demo-quick; PROJECT=folder: another), once every image and animation in it
# loads, and its registered model in the MLflow UI (a loopback server, stopped when done).
screenshots: setup
	$(PY) benchmarks/screenshots.py $(or $(PROJECT),$(DEMO_DIR))

# The demo pipeline with an SD3-shaped rectified-flow teacher (configs/demo-sd3.yaml): shapes -> a tiny SD3 pipeline
# trained from scratch -> PCM M = 1, 2, 4 and LCM -> the step table beside the teacher's own Euler -> the registry; the
# same DVC stages as `make demo`, in a copy of the repo under .demo-sd3/ (the real demo's outputs stay untouched).
demo-sd3: setup
	rm -rf .demo-sd3 && mkdir -p .demo-sd3
	git ls-files -z | xargs -0 cp --parents -t .demo-sd3
	cp configs/demo-sd3.yaml .demo-sd3/params.yaml
	cd .demo-sd3 && git init -q
	cd .demo-sd3 && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(CURDIR)/$(PY) $(CURDIR)/benchmarks/machine_speed.py \
		run demo-sd3 -- $(CURDIR)/$(PY) $(CURDIR)/$(REPRO)
	@echo; echo "the flow teacher's own Euler + CFG (demo_teacher.eval_*) on held-out prompts, read by the oracle:"
	@grep -E '^  "main_(colour|kind)_acc"' .demo-sd3/models/demo-teacher/metrics.json
	@echo; cat .demo-sd3/reports/eval/steps.md; echo
	@echo "report (open in a browser):  .demo-sd3/reports/eval/report.html"
	@echo "registered model:            $$(cat .demo-sd3/models/registered.json | tr -d '\n ')"

bench: setup
	$(PY) benchmarks/toy_gmm.py

bench-step: setup
	$(PY) benchmarks/train_step.py

# `pcm distill` beside the PCM authors' SD1.5 training script on the same tiny teacher, data, batch, precision and
# threads: steps/s, start-up and finish. Their repository is cloned at a pinned commit into ~/.cache (needs git and
# the network) unless REFERENCE names a local clone; more options: BENCH_REFERENCE_ARGS="--steps 40 --repeats 3".
bench-reference: setup
	$(PY) benchmarks/reference_side_by_side.py $(if $(REFERENCE),--reference $(REFERENCE)) $(BENCH_REFERENCE_ARGS)

# SDXL-size UNet on a GPU (bf16, gradient checkpointing, LoRA rank 64, batch 10); says so and exits 0 without CUDA.
bench-gpu: setup
	$(PY) benchmarks/sdxl_gpu.py

# The GPU checks in one run (~8 min on one GPU; each part has its own cap, results written as it goes).
# Rerun some parts: make gpu-check GPU_CHECK_ARGS="--parts 1,3"
gpu-check: setup
	timeout 540 $(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The paper's claims on the analytic teacher, with confidence intervals (about 5 min on 2 cores).
bench-claims: setup
	$(PY) benchmarks/claims.py

# Loader samples/s per worker (PNG, JPEG, latents at 512 / 1024 px) against what 8 GPUs consume.
bench-loader: setup
	$(PY) benchmarks/loader_throughput.py

# Seconds to write, fsync and verify an SDXL-size checkpoint (LoRA rank 64 + AdamW moments) on this disk.
bench-checkpoint: setup
	$(PY) benchmarks/checkpoint_write.py

# Regenerates requirements.lock from pyproject.toml in a throwaway venv.
lock:
	rm -rf /tmp/pcm-lock-venv && $(PYTHON) -m venv /tmp/pcm-lock-venv
	/tmp/pcm-lock-venv/bin/pip install --quiet -e '.[dev]'
	( echo "# Exact versions of every package (make lock regenerates it). torch is the CPU wheel here, the CUDA one on GPU hosts."; \
	  /tmp/pcm-lock-venv/bin/pip freeze --all | grep -vE '^(-e |pcm-pipelines|pip==|wheel==)' | sed 's/+cpu//' | sort -f ) > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
