# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build (this default is the one CI uses).
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@

demo: setup
	$(BIN)/lsdc demo --out demo_out

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
