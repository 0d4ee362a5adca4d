# The two commands: `make run` (a local cluster) and `make test`.
# Extra arguments: make run ARGS="--scale scheduler=2 --nodes node-1,node-2"
#                  make test PYTEST_ARGS="tests/unit -x"
VENV := .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup proto run test bench compose-check

setup:
	bash deploy/setup.sh

proto:
	$(VENV)/bin/python -m cirrus.protogen

run: setup
	$(VENV)/bin/cirrus-launch $(ARGS)

test: setup proto
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench:
	$(VENV)/bin/python bench/vm_pipeline.py $(ARGS)

compose-check:
	docker-compose config -q
