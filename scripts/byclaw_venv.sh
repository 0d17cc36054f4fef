#!/usr/bin/env bash
# The byclaw worker venv: Python >= 3.12 with byclaw-gateway-sdk 0.1.1 from PyPI,
# unmodified. Seed 003's workers run in it as their own processes; our
# commander (Python 3.11) never imports the SDK, it speaks its Redis Streams
# format (commander/byclaw).
#
#   scripts/byclaw_venv.sh [DIR]     create or refresh DIR (default .venv-byclaw)
#
# Idempotent: DIR/.deps records what was installed; a second run with the same
# pins does nothing and needs no network. Offline: the pinned wheels (pure
# Python) are kept in a wheelhouse, $BYCLAW_WHEELS (default .cache/byclaw-wheels),
# downloaded from PyPI the first time; the venv is always installed from it
# with --no-index, so it can be re-created without a network (copy the
# wheelhouse to an offline machine). The interpreter: $BYCLAW_PYTHON, else
# python3.13 / python3.12 on PATH, else a pyenv 3.12+ (the machine image has
# /root/.pyenv/versions/3.12.1).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.venv-byclaw}"
PINS=("byclaw-gateway-sdk==0.1.1" "redis==8.2.0")

log() { echo "byclaw_venv.sh: $*" >&2; }

find_python() {
	local candidates=()
	[[ -n "${BYCLAW_PYTHON:-}" ]] && candidates+=("$BYCLAW_PYTHON")
	candidates+=(python3.13 python3.12)
	local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
	if [[ -d "$pyenv_root/versions" ]]; then
		while IFS= read -r p; do candidates+=("$p"); done < <(
			ls -d "$pyenv_root"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -rV)
	fi
	local c
	for c in "${candidates[@]}"; do
		if command -v "$c" >/dev/null 2>&1 &&
			"$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
			command -v "$c"
			return
		fi
	done
	log "no Python >= 3.12 found (byclaw-gateway-sdk needs it): set BYCLAW_PYTHON"
	exit 1
}

want="${PINS[*]}"
if [[ -x "$DIR/bin/python" && -f "$DIR/.deps" && "$(cat "$DIR/.deps")" == "$want" ]]; then
	exit 0
fi
if [[ ! -x "$DIR/bin/python" ]]; then
	py=$(find_python)
	log "creating $DIR with $py"
	"$py" -m venv "$DIR"
fi
WHEELS="${BYCLAW_WHEELS:-$ROOT/.cache/byclaw-wheels}"
pip_q=(-q --disable-pip-version-check)
if ! "$DIR/bin/python" -m pip install "${pip_q[@]}" --no-index --find-links "$WHEELS" "${PINS[@]}" 2>/dev/null; then
	log "fetching ${PINS[*]} from PyPI into $WHEELS"
	mkdir -p "$WHEELS"
	"$DIR/bin/python" -m pip download "${pip_q[@]}" --only-binary=:all: -d "$WHEELS" "${PINS[@]}"
	"$DIR/bin/python" -m pip install "${pip_q[@]}" --no-index --find-links "$WHEELS" "${PINS[@]}"
fi
"$DIR/bin/python" -c 'import byclaw_gateway_sdk'
echo "$want" >"$DIR/.deps"
log "ready: $DIR ($want)"
