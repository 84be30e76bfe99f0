#!/usr/bin/env bash
# Installs the Debian packages the project needs (as root), or prints the command to run.
# Quick when everything is already there: one dpkg-query call.
set -euo pipefail
# systemd: systemd-analyze verifies contrib/systemd/ (tests/test_service_units.py);
# openssl: the self-signed HTTPS pair and the certificate-rotation tests
# postgresql: the farm tests start a throw-away server (tests/support/postgres.py)
# qemu-system-x86, qemu-utils, libvirt-daemon-driver-qemu: tiny TCG guests under a private
# libvirtd, where hypervisor behaviour is the point (tests/test_hotplug_qemu.py)
pkgs=(libvirt0 libvirt-dev pkg-config gcc python3-dev dbus-daemon libvirt-daemon libvirt-clients sblim-wbemcli
      systemd openssl postgresql qemu-system-x86 qemu-utils libvirt-daemon-driver-qemu)
missing=()
for p in "${pkgs[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$st" == *"install ok installed"* ]] || missing+=("$p")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages. Run as root:" >&2
  echo "  apt-get update && $cmd" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
$cmd
