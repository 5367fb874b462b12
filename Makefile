# `make finetune`: set up a fresh machine and run the main job; `make test`: set up and run the tests.
.PHONY: setup finetune test bench-quick

setup:
	./scripts/setup.sh

finetune: setup
	.venv/bin/giva finetune

test: setup
	.venv/bin/python -m pytest -q

bench-quick: setup
	.venv/bin/giva bench --quick
