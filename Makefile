# fr_dist: `make demo` (set up + 2-rank CPU training on the synthetic RecordIO set), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,deepspeed,dali,triton
NPROC ?= 2
DEMO_CONFIG ?= configs/demo_cpu.yaml
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo demo-pfc demo-losses test test-launch lint bench-smoke clean

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 (a plain `torch` would pull a multi-GB CUDA build)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	OMP_NUM_THREADS=1 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 $(PY) -m fr_dist.launch --standalone --nproc_per_node=$(NPROC) -m fr_dist.cli train \
		--config $(DEMO_CONFIG) $(DEMO_ARGS)

demo-pfc:
	$(MAKE) demo DEMO_CONFIG=configs/demo_cpu_pfc.yaml

# every loss's CPU demo (configs/demo_cpu*.yaml; trained here where its run folder has no results.json),
# then the table (accuracy, VAL@FAR=1e-3, images/s) and one ROC figure: benchmarks/results/<hw>_<yyyymm>/
demo-losses: $(VENV)/.installed
	$(PY) -m benchmarks.demo_losses --run $(if $(DEMO_ARGS),--run-args "$(DEMO_ARGS)")

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# launch scripts, fr-dist doctor, two-host torchrun (netns) and a real Slurm cluster (root)
test-launch: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/launch $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fr_dist tests benchmarks && $(VENV)/bin/ruff format --check fr_dist tests benchmarks

bench-smoke: $(VENV)/.installed
	$(PY) -m benchmarks.classifier --world-sizes 2 --num-classes 1000 --steps 3 --dim 128 --batch 16
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.train_throughput --smoke && bash -n benchmarks/gpu_check.sh
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.demo_losses --smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
