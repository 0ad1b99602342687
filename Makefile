# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build (this default is the one CI uses).
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup demo test FORCE
setup: $(VENV)/.installed

# A strict editable install: each module is a link under build/, on sys.path. setuptools' default (lenient) editable
# finder runs after the current directory is searched, so in a folder holding its own `cache/` (a crop cache, say)
# `import cache` would find that folder instead. Strict links only the modules present at install time, so adding or
# removing one reinstalls (the module list below), as does a deleted build/ (its links are the install).
$(VENV)/.installed: pyproject.toml $(VENV)/.modules
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev]' --config-settings editable_mode=strict
	echo '$(TORCH_SPEC)' > $(VENV)/.torch_spec
	touch $@

$(VENV)/.modules: FORCE
	@mkdir -p $(VENV)
	@{ find cache prep train lsdc -name '*.py' | sort; ls -d build/__editable__.* 2>/dev/null || true; } > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

# A TORCH_SPEC given to make (command line or environment) that differs from the one installed reinstalls into
# .venv; a plain `make` never swaps the torch build a user chose.
ifneq ($(origin TORCH_SPEC),file)
$(VENV)/.installed: $(VENV)/.torch_spec
$(VENV)/.torch_spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@
endif

demo: setup
	$(BIN)/lsdc demo --out demo_out

# The linter first (pyproject.toml [tool.ruff]: its rules, clean), then the suite.
test: setup
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
