# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Both install what they need (system packages as root, the venv, the DMTF schema) and
# are quick when already set up.
VENV       := .venv
PY         := $(VENV)/bin/python
SCHEMA_ZIP := build/schema/cim_schema_2.49.0Final-MOFs.zip
PYTEST     := $(VENV)/bin/pytest

.PHONY: setup sysdeps demo lint test test-dbus-next bench fuzz clean

setup: sysdeps $(VENV)/.installed $(SCHEMA_ZIP) build/cache/.compiled

sysdeps:
	@bash scripts/sysdeps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c 'import pywbem, aiohttp, libvirt, dbus_fast, dbus_next, pytest, uvloop, pam, psutil'
	@touch $@

$(SCHEMA_ZIP): | $(VENV)/.installed
	@bash scripts/fetch_schema.sh $@ $(VENV)/bin/pip

# Compile the DMTF classes the project needs once, so every start-up reads the cache.
build/cache/.compiled: $(SCHEMA_ZIP) $(wildcard mof/*.mof) cim_provider/wbem/repository.py
	@$(PY) -c 'from cim_provider.wbem.repository import Repository; Repository.load()'
	@touch $@

demo: setup
	$(VENV)/bin/cim-provider demo

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check cim_provider tests bench
	$(VENV)/bin/mypy cim_provider

# The D-Bus tests run twice: with dbus-fast (the default) and with dbus-next.
test: setup lint
	$(PYTEST) -q
	CIM_PROVIDER_DBUS=dbus_next $(PYTEST) -q -m dbus

bench: setup
	$(PY) -m bench

fuzz: setup
	CIM_PROVIDER_FUZZ_EXAMPLES=5000 $(PYTEST) -q -m fuzz

clean:
	rm -rf build $(VENV) *.egg-info
