# One entry point for developers and CI. Every target creates .venv when absent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv demo fleet-demo lifecycle-demo lm-demo test lint typecheck unit proto proto-check config-doc bench loadtest compare scale-check testbed plan-check compose-check pi-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to 2.13.0 (its CPU wheel is local on our machines);
	# installing it first keeps any other requirement from pulling a CUDA build.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv with everything installed

demo: $(STAMP) ## cloud + two edges on digits, split KD, ONNX, report in runs/latest
	$(BIN)/python -m splitkd.demo

lm-demo: $(STAMP) ## transformer teacher -> on-device byte-level LM by split KD; perplexity, wire, ONNX tokens/s in runs/lm/latest
	$(BIN)/python -m splitkd.lm_demo $(LM_ARGS)

fleet-demo: $(STAMP) ## 4 non-IID edges learn one student together: split and federated cohorts vs references
	$(BIN)/python -m splitkd.fleet_demo $(FLEET_ARGS)

lifecycle-demo: $(STAMP) ## DiReDi: base student -> feedback -> adapt -> new teacher -> new student, table + plot
	$(BIN)/python -m splitkd.lifecycle_demo

test: $(STAMP) proto-check lint typecheck unit ## everything CI runs: protos, config page, ruff, mypy, pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q --durations=15

proto: $(STAMP) ## regenerate splitkd/v1 from protos/ (commit the result)
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. protos/splitkd/v1/splitkd.proto
	$(BIN)/python scripts/protocol_doc.py

proto-check: $(STAMP) ## fail when the committed stubs or docs drift from the .proto or the settings
	$(BIN)/python scripts/check_protos.py
	$(BIN)/python scripts/protocol_doc.py --check
	$(BIN)/python scripts/config_doc.py --check

config-doc: $(STAMP) ## regenerate docs/CONFIGURATION.md from the settings classes (commit the result)
	$(BIN)/python scripts/config_doc.py

bench: $(STAMP) ## split step vs in-process step, wire bytes vs raw tensor bytes, each wire codec's bytes and accuracy, link emulator vs its delay
	$(BIN)/python -m benchmarks.step_bench
	$(BIN)/python -m benchmarks.wire_bench
	$(BIN)/python -m benchmarks.linkemu_bench

loadtest: $(STAMP) ## 64 edges on one cloud: closed loop (60 s), paced as real devices (90 s), capacity at p99 <= 50 ms (7 x 20 s); with and without teacher micro-batching (~12 min)
	$(BIN)/python -m benchmarks.loadtest $(LOADTEST_ARGS)

scale-check: $(STAMP) ## 3 replicas behind a real Envoy, 32 simulated + 2 real edges, one replica SIGKILLed: nothing lost
	$(BIN)/python -m benchmarks.scale_check $(SCALE_ARGS)

compare: $(STAMP) ## Flower 1.42 FedAvg (own venv .venv-flower) vs splitkd, same shards: accuracy, bytes per device, seconds
	$(BIN)/python -m benchmarks.compare $(COMPARE_ARGS)

plan-check: $(STAMP) ## (root) the planner on the testbed's Ethernet and LTE links: predicted vs measured, pipelining
	$(BIN)/python -m testbed.plan_check $(PLAN_CHECK_ARGS)

compose-check: $(STAMP) ## (root) build the images, run docker-compose.yml for real, check it, tear down
	scripts/compose_check.sh

pi-check: $(STAMP) ## (root) install.sh on emulated Pi 4/5 CPUs (arm64 chroot, qemu); PI_TRAIN=1 adds training
	PI_CHECK_PYTHON=$(BIN)/python PI_TRAIN=$(PI_TRAIN) scripts/pi_check.sh $(PI_CHECK_ARGS)

testbed: $(STAMP) ## (root) cloud + 3 edges in network namespaces, shaped links, report in runs/testbed
	$(BIN)/python -m testbed.run

clean:
	rm -rf runs .splitkd-cloud .mypy_cache .ruff_cache .pytest_cache
