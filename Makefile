# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build (this default is the one CI uses).
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup demo test FORCE
setup: $(VENV)/.installed

# The torch spec last installed: rewritten only when TORCH_SPEC changes, so a new one reinstalls into .venv.
$(VENV)/.torch_spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch_spec
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@

demo: setup
	$(BIN)/lsdc demo --out demo_out

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
