# Free-Mask: every install step lives here, so a fresh machine needs only `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/freemask/v1/*.proto)
PROTO_OUT := services/v1
PROTO_STAMP := $(PROTO_OUT)/.generated
PYTEST_ARGS ?=
# FOPA in the embedded Triton's model repository, generated from the shipped weights (never committed)
FOPA_WEIGHTS := $(wildcard services/placement/weights/fopa/*)
FOPA_SOURCES := $(addprefix services/placement/,export.py triton_repo.py triton_model.py model.py geometry.py)
TRITON_FOPA := deploy/triton/models/fopa/config.pbtxt

.PHONY: run test faults protos bench bench-sweep bench-headline bench-gpu bench-instruments models clean stack-up stack-down triton-production images chart

## run: install, bring up the embedded stack and every service, run the main job, shut down
run: $(INSTALLED) $(PROTO_STAMP) $(TRITON_FOPA)
	$(VENV)/bin/freemask run

## test: install and run the whole test suite (unit, contract, integration against the real servers)
test: $(INSTALLED) $(PROTO_STAMP) $(TRITON_FOPA)
	$(PY) -m pytest $(PYTEST_ARGS)

## faults: the fault suite alone (crashes, broker restart, Triton down, poison input, load, secrets); `make test` runs it too
faults: $(INSTALLED) $(PROTO_STAMP) $(TRITON_FOPA)
	$(PY) -m pytest -m faults tests/faults $(PYTEST_ARGS)

## bench: measure (timings live here, never in pass/fail tests); writes tests/benchmarks/results/
bench: $(INSTALLED) $(PROTO_STAMP) $(TRITON_FOPA)
	$(PY) tests/benchmarks/bench_platform.py
	$(PY) tests/benchmarks/bench_generator.py
	$(PY) tests/benchmarks/bench_attention_mask.py
	$(PY) tests/benchmarks/bench_thesaurus.py
	$(PY) tests/benchmarks/bench_placement.py
	$(PY) tests/benchmarks/bench_harmonization.py
	$(PY) tests/benchmarks/bench_scoring.py
	$(PY) tests/benchmarks/bench_pipeline.py
	$(PY) tests/benchmarks/bench_evaluation.py

## bench-sweep: the generator's sampling study (guidance x eta, 12 minutes on 2 cores; results/generator_sampling.json),
## kept out of `bench` so that the suite fits an hour on 2 cores
bench-sweep: $(INSTALLED) $(PROTO_STAMP)
	$(PY) tests/benchmarks/bench_generator.py --sampling-sweep

## bench-headline: the evaluation with the headline pair (real, Free-Mask) trained ten times each and every other entry
## three times instead of two, the selection controls and the refined-singles entry (results/evaluation.json),
## kept out of `bench` for the same reason
bench-headline: $(INSTALLED) $(PROTO_STAMP) $(TRITON_FOPA)
	$(PY) tests/benchmarks/bench_evaluation.py --seeds 3 --headline-seeds 10 --selection-controls --singles

## bench-gpu: on a machine with an NVIDIA GPU, the SD-1.5-sized attention-mask path, FOPA and RAIN (results/gpu.json),
## and Triton's batching gain with FOPA on the GPU (results/placement_gpu.json)
bench-gpu: $(INSTALLED) $(PROTO_STAMP)
	$(PY) tests/benchmarks/bench_gpu.py --compile
	$(PY) tests/benchmarks/bench_placement.py --target embedded-gpu

## bench-instruments: retrain the benchmarks' shipped judge and oracle segmenter (seeded; 5 minutes on 2 cores), after
## a change to their code or to the world's rendering (tests/unit/test_benchmark_instruments.py says when)
bench-instruments: $(INSTALLED) $(PROTO_STAMP)
	$(PY) tests/benchmarks/bench_generator.py --ship-judge
	$(PY) tests/benchmarks/bench_attention_mask.py --ship-oracle

## models: retrain the shipped small models from scratch on 2 CPU cores (seeded, logged next to the weights)
models: $(INSTALLED) $(PROTO_STAMP)
	$(PY) -m freemask.attention_mask.generator.train --out services/attention_mask/weights/generator --max-steps 8000 --minutes 120 --seed 0
	$(PY) -m freemask.attention_mask.affinity_train --out services/attention_mask/weights/affinity --steps 2500 --seed 0
	$(PY) -m freemask.placement.train --out services/placement/weights/fopa --minutes 15 --seed 0
	$(PY) -m freemask.harmonization.train --out services/harmonization/weights/rain --minutes 10 --seed 0

## protos: generate the Python code for protos/ (never committed, never edited)
protos: $(PROTO_STAMP)

## triton-production: FOPA for the NGC Triton image (onnxruntime backend, GPU) in build/triton-production
triton-production: $(INSTALLED) $(PROTO_STAMP)
	$(VENV)/bin/freemask placement export --target production --out build/triton-production

# Container images (deploy/docker): the GPU image for the model services, the CPU image for the rest
IMAGE_REPO ?= freemask
IMAGE_TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
VCS_REF := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

## images: build $(IMAGE_REPO)-gpu and $(IMAGE_REPO)-cpu:$(IMAGE_TAG) with a local Docker engine (deploy/README.md)
images:
	@docker info > /dev/null 2>&1 || { echo "make images: no Docker engine here (no docker command, or no daemon" \
		"answering it); tests/unit/test_deploy_files.py checks the Dockerfiles statically" >&2; exit 1; }
	docker build -f deploy/docker/Dockerfile.gpu --build-arg VCS_REF=$(VCS_REF) -t $(IMAGE_REPO)-gpu:$(IMAGE_TAG) .
	docker build -f deploy/docker/Dockerfile.cpu --build-arg VCS_REF=$(VCS_REF) -t $(IMAGE_REPO)-cpu:$(IMAGE_TAG) .

## chart: lint and render charts/freemask with every ci/*.yaml, validate the manifests (Kubernetes 1.30) and check them
chart: $(INSTALLED) $(PROTO_STAMP)
	$(PY) charts/sync_config_schema.py --check
	$(PY) -m pytest tests/unit/test_chart.py

# the whole fopa/ directory is rebuilt and swapped in at once, so its config.pbtxt dates it
$(TRITON_FOPA): $(FOPA_WEIGHTS) $(FOPA_SOURCES) $(INSTALLED) $(PROTO_STAMP)
	$(VENV)/bin/freemask placement export --target embedded --out deploy/triton/models

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(PROTO_STAMP): $(PROTO_SRC) $(INSTALLED)
	rm -rf build/protos $(PROTO_OUT)
	mkdir -p build/protos $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=build/protos --grpc_python_out=build/protos \
		--pyi_out=build/protos $(PROTO_SRC)
	cp build/protos/freemask/v1/*.py build/protos/freemask/v1/*.pyi $(PROTO_OUT)/
	echo '"""Generated by `make protos` from protos/freemask/v1; do not edit."""' > $(PROTO_OUT)/__init__.py
	touch $@

stack-up: $(INSTALLED) $(PROTO_STAMP) $(TRITON_FOPA)
	$(VENV)/bin/freemask stack up

stack-down: $(INSTALLED)
	$(VENV)/bin/freemask stack down

clean:
	rm -rf build $(PROTO_OUT) .pytest_cache deploy/triton/models/fopa
