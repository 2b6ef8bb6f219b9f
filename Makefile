# The two set-up commands of the README. Each creates .venv and installs what it needs.
.PHONY: demo test

demo:
	./scripts/setup.sh
	.venv/bin/merit demo

test:
	EXTRAS=test ./scripts/setup.sh
	.venv/bin/python -m pytest -q
