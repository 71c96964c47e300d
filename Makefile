# The two set-up commands of the README. Both install into ./.venv first (scripts/install.sh, idempotent).
.PHONY: demo test install install-test

demo: install
	.venv/bin/gemma3-qat formats

test: install-test
	.venv/bin/python -m pytest

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test
