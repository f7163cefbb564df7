# sj-sfn: the two commands are `make test` and `make demo`; both install the stack first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sj-sfn-installed
PYTEST_ARGS ?=

.PHONY: install test demo lint bench-data clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/sj-sfn demo

lint: install
	$(VENV)/bin/ruff check sj_sfn tests bench classification detection

# Fashion-MNIST, photos and English text (fortunes) for the benchmarks (Debian packages; needs root)
bench-data:
	apt-get update && apt-get install -y dataset-fashion-mnist darknet fortunes

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
