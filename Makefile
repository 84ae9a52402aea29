# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# `make image` builds the container image of the K8s manifests (Dockerfile) with docker or podman.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The image name: also what `lsnet jobs schedule --emit k8s*` writes into the manifests ($LSNET_IMAGE).
# Default tag: this checkout's commit (a manifest must pin what it runs; never :latest).
COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
IMAGE  ?= $(or $(LSNET_IMAGE),lsnet:$(COMMIT))
# py311-cpu or py311-gpu: the Ray base image variant (CUDA for GPU nodes)
RAY_VARIANT ?= py311-cpu
ENGINE ?= $(firstword $(shell command -v docker podman 2>/dev/null))

.PHONY: install test test-long demo bench lint clean image

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# also the minutes-long end-to-end tests (marker `long`) and the cluster tests (S3 search/ablation, two nodes)
test-long: $(STAMP)
	LSNET_SLOW_TESTS=1 LSNET_CLUSTER_TESTS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/lsnet demo

bench: $(STAMP)
	$(VENV)/bin/lsnet bench $(NAME)

lint: $(STAMP)
	$(VENV)/bin/ruff check lsnet pipelines tests

image:
	@if [ -z "$(ENGINE)" ]; then \
	  echo "make image: neither docker nor podman is installed here; install one (or build the Dockerfile elsewhere)" >&2; \
	  exit 1; fi
	@$(ENGINE) info >/dev/null 2>&1 || { \
	  echo "make image: $(ENGINE) is installed but cannot reach its daemon/service ($(ENGINE) info fails)" >&2; exit 1; }
	$(ENGINE) build -t $(IMAGE) --build-arg RAY_VARIANT=$(RAY_VARIANT) \
	  --build-arg LSNET_GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null || echo unknown) .
	@echo "built $(IMAGE); tag and push it where the cluster pulls from (e.g. $(ENGINE) tag $(IMAGE) REGISTRY/$(IMAGE) && $(ENGINE) push REGISTRY/$(IMAGE)), then lsnet jobs schedule ... --image REGISTRY/$(IMAGE)"

clean:
	rm -rf $(VENV) results/demo
