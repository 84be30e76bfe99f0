# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Both install what they need (system packages as root, the venv, the DMTF schema) and
# are quick when already set up.
VENV       := .venv
PY         := $(VENV)/bin/python
# The checkout keeps the DMTF schema and the compiled classes in build/ (the default
# cache directory when running from a checkout; an installed cim-provider uses
# /var/cache/cim-provider or ~/.cache/cim-provider, see `cim-provider setup-schema`).
CACHE_DIR  := build
SCHEMA_ZIP := $(CACHE_DIR)/schema/cim_schema_2.49.0Final-MOFs.zip
PYTEST     := $(VENV)/bin/pytest

.PHONY: setup sysdeps demo lint test test-dbus-next bench fuzz clean

setup: sysdeps $(VENV)/.installed $(SCHEMA_ZIP) $(CACHE_DIR)/classes/.compiled

sysdeps:
	@bash scripts/sysdeps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c 'import pywbem, aiohttp, libvirt, dbus_fast, dbus_next, pytest, uvloop, pam, psutil, psycopg, jinja2'
	@touch $@

# Fetched once from pywbem's source distribution on the package index (never committed),
# by the same command an installed cim-provider offers.
$(SCHEMA_ZIP): | $(VENV)/.installed
	@$(VENV)/bin/cim-provider setup-schema --cache-dir $(CACHE_DIR)

# Compile the DMTF classes the project needs once, so every start-up reads the cache.
$(CACHE_DIR)/classes/.compiled: $(SCHEMA_ZIP) $(wildcard mof/*.mof) cim_provider/wbem/repository.py
	@$(VENV)/bin/cim-provider setup-schema --cache-dir $(CACHE_DIR)
	@touch $@

demo: setup
	$(VENV)/bin/cim-provider demo

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check cim_provider tests bench
	$(VENV)/bin/mypy cim_provider

# Everything runs once with dbus-fast (the default); the tests of the D-Bus layer itself
# (client, reference service, contract, paging, templates and policy signals) run again
# with dbus-next, so both libraries stay supported without running every end-to-end
# test twice (make test stays under 15 minutes on 2 cores).
DBUS_LAYER_TESTS := tests/test_manager_client.py tests/test_manager_service.py \
	tests/test_manager_contract.py tests/test_manager_paging.py tests/test_manager_truth.py \
	tests/test_model_manager.py tests/test_templates.py tests/test_policy.py
test: setup lint
	$(PYTEST) -q
	CIM_PROVIDER_DBUS=dbus_next $(PYTEST) -q -m "dbus and not slow" $(DBUS_LAYER_TESTS)

bench: setup
	$(PY) -m bench

fuzz: setup
	CIM_PROVIDER_FUZZ_EXAMPLES=5000 $(PYTEST) -q -m fuzz

clean:
	rm -rf build $(VENV) *.egg-info
