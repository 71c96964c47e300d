# The two set-up commands of the README. Both install into ./.venv first (scripts/install.sh, idempotent).
.PHONY: demo test install install-test

# The main job on the embedded default model and data: QAT (int4-block, CPU), then its GGUF.
demo: install
	.venv/bin/gemma3-qat train --format int4-block --output runs/demo --force
	.venv/bin/gemma3-qat export --to gguf runs/demo --force

test: install-test
	.venv/bin/python -m pytest

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test
