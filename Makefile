# The README's two commands: `make demo` and `make test`. Each creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair this project is developed and tested with (the only pair installable on the dev machines).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[dev]" $(TORCH_PINS)   # dev: peers (bench) and TensorBoard too; pins kept
	touch $@

install: $(VENV)/.installed

demo: install
	WANDB_MODE=offline $(PY) examples/demo.py

# The whole suite under `lightning.pytorch`, then every Trainer-building test (marked `lightning` by
# tests/conftest.py) again under `pytorch_lightning` (slow trainings once only).
test: install
	$(VENV)/bin/ruff check lightning_xai tests examples benchmarks
	$(PY) -m pytest -q
	LIGHTNING_XAI_NAMESPACE=pytorch_lightning $(PY) -m pytest -q -m "lightning and not slow"

lint: install
	$(VENV)/bin/ruff check lightning_xai tests examples benchmarks

bench: install
	$(PY) benchmarks/attribution.py

clean:
	rm -rf $(VENV) wandb lightning_logs runs outputs
