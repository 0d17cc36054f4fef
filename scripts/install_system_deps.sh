#!/usr/bin/env bash
# Installs the Debian packages the local sandbox server (localsandbox/) needs:
#   xvfb     the X server each sandbox runs (one display per sandbox)
#   xdotool  real mouse and keyboard input through XTEST
#   xterm    a real X application the tests and the demo type into
#   chromium the headless browser the web page test drives (internal/httpapi)
# Idempotent: does nothing when every tool is already on PATH. Runs apt-get
# update at most once per call. Needs root (or passwordless sudo).
set -euo pipefail

packages=(xvfb xdotool xterm chromium)
tools=(Xvfb xdotool xterm chromium)

missing=0
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing=1
done
if [[ $missing -eq 0 ]]; then
  echo "install_system_deps: ${tools[*]} already present"
  exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install_system_deps: need root to install ${packages[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"

for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || { echo "install_system_deps: $t still missing" >&2; exit 1; }
done
echo "install_system_deps: installed ${packages[*]}"
