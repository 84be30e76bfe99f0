#!/usr/bin/env bash
# Fetches the DMTF CIM Schema 2.49 MOF zip out of pywbem's source distribution on the
# package index, with nothing but pip: for a host without the index, fetch it here and
# run `cim-provider setup-schema --from ZIP` there. (`cim-provider setup-schema` and
# `make setup` fetch it themselves, see cim_provider/schema_setup.py; keep `ver` equal
# to its PYWBEM_SDIST_VERSION -- tests/test_install.py checks.) The schema is never committed.
#   scripts/fetch_schema.sh DEST.zip [PIP]
set -euo pipefail
dest=${1:?destination zip}
pip=${2:-pip3}
ver=1.9.1
[ -s "$dest" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$pip" download -q --no-deps --no-binary :all: "pywbem==$ver" -d "$tmp" 2>&1 | grep -v '^WARNING: Location' || true
sdist=$(ls "$tmp"/pywbem-*.tar.gz)
mkdir -p "$(dirname "$dest")"
tar -xzf "$sdist" -C "$tmp" "pywbem-$ver/tests/schema/cim_schema_2.49.0Final-MOFs.zip"
mv "$tmp/pywbem-$ver/tests/schema/cim_schema_2.49.0Final-MOFs.zip" "$dest"
echo "fetched $dest"
