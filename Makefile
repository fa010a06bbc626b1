# Forge. The two commands: `make run` (the demo pipeline on the local stack) and `make test`.
SHELL := /bin/bash
VENV := .venv
.DEFAULT_GOAL := help
.PHONY: help setup setup-axolotl run test stop status bench bench-compress bench-modifiers bench-routing lint

help:
	@echo "make run [ONCE=1] [CONF='{json}']  start the stack, run the demo pipeline, keep the UIs up until Ctrl-C"
	@echo "                                   (ONCE=1: stop the stack at the end; exit status = the run's result)"
	@echo "make test                          the whole test suite (pytest)"
	@echo "make stop | status                 stop the stack / show what runs"
	@echo "make bench                         end-to-end demo benchmark (wall, job and Airflow overhead, memory)"
	@echo "make bench-compress                phase 2 per step: bytes in/out, time, peak RAM, quality delta"
	@echo "make bench-modifiers               1C + the modifiers per subphase: wall time, teacher calls and cost per tier"
	@echo "make bench-routing                 router + detector latency per request, session store ops/s (SQLite, Redis)"
	@echo "make lint                          ruff"
	@echo "make setup                         .venv from requirements.txt (only when it changed)"
	@echo "make setup-axolotl                 .venv-axolotl: Axolotl's own runtime (its pins clash with .venv's)"

setup:
	@scripts/setup.sh

# Axolotl (the modifiers' training backend) pins transformers/peft apart from llm-compressor: own venv.
setup-axolotl:
	@scripts/setup_axolotl.sh

run: setup
	@scripts/run.sh $(if $(ONCE),--once) $(if $(CONF),--conf '$(CONF)')

# pytest exits 5 when it collected nothing: that is a failure too, said plainly.
test: setup setup-axolotl
	@$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

stop:
	@scripts/stack.sh stop

status:
	@scripts/stack.sh status || true

bench: setup
	@$(VENV)/bin/python benchmarks/demo_e2e.py $(BENCH_ARGS)

bench-compress: setup
	@$(VENV)/bin/python benchmarks/compression.py $(BENCH_ARGS)

bench-modifiers: setup setup-axolotl
	@$(VENV)/bin/python benchmarks/modifiers.py $(BENCH_ARGS)

bench-routing: setup
	@$(VENV)/bin/python benchmarks/routing.py $(BENCH_ARGS)

lint: setup
	@$(VENV)/bin/ruff check .
