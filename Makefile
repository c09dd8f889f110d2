# The two commands of the README. Each does its own set-up on a fresh machine.
.PHONY: setup demo test check bench-codec

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/fedfstq demo $(ARGS)

test: setup
	bash scripts/check
	.venv/bin/python -m pytest $(ARGS)

bench-codec: setup
	.venv/bin/fedfstq bench codec $(ARGS)
