# The two commands of the README. Each does its own set-up on a fresh machine.
.PHONY: setup lock demo test check bench-codec bench-faults bench-fleet bench-inference bench-brokers

setup:
	bash scripts/setup.sh

# Refresh the lock files deliberately (today's releases within pyproject's ranges); commit the
# result after `make test` passes with it.
lock:
	bash scripts/lock.sh

demo: setup
	.venv/bin/fedfstq demo $(ARGS)

# CI (CI=true) also runs the slow tests: process kills, packet loss, long fuzzing (~5 min).
SLOW := $(if $(filter true,$(CI)),-m "slow or not slow",)

test: setup
	bash scripts/check
	.venv/bin/python -m pytest $(SLOW) $(ARGS)

bench-codec: setup
	.venv/bin/fedfstq bench codec $(ARGS)

# The evaluation fleet (EVALUATION.md has the exact runs); ARGS="--help" lists the options.
bench-fleet: setup
	.venv/bin/fedfstq bench fleet $(ARGS)

bench-brokers: setup
	.venv/bin/fedfstq bench brokers $(ARGS)

bench-inference: setup
	.venv/bin/fedfstq bench inference $(ARGS)

# Every fault scenario, slow ones included (RELIABILITY.md): prints the reliability table at the
# end and writes it as JSON to FAULT_REPORT.
FAULT_REPORT ?= runs/fault-report.json
bench-faults: setup
	mkdir -p $(dir $(FAULT_REPORT))
	.venv/bin/python -m pytest tests/faults -m "slow or not slow" --fault-report=$(FAULT_REPORT) $(ARGS)
