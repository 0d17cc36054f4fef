#!/usr/bin/env bash
# Checks docker-compose.yml with `docker compose config` (needs no Docker
# daemon). Without the compose plugin, builds it once from its Go module
# (github.com/docker/compose/v2, through the Go module proxy) into
# .tools/docker-compose (about 3 minutes on 2 cores) and uses that.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPOSE_VERSION=${COMPOSE_VERSION:-v2.39.2}

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  bin="$ROOT/.tools/docker-compose-$COMPOSE_VERSION"
  if [[ ! -x $bin ]]; then
    echo "check_compose: building docker compose $COMPOSE_VERSION from its Go module" >&2
    src=$(go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cp -r "$src/." "$work/"
    chmod -R u+w "$work"
    mkdir -p "$ROOT/.tools"
    (cd "$work" && CGO_ENABLED=0 go build -trimpath -o "$bin" ./cmd)
  fi
  compose=("$bin")
fi
cd "$ROOT"
# The file must require the tokens (an empty one would publish an
# unauthenticated dispatcher): without them, config must fail.
if env -u DISPATCHER_CLIENT_TOKEN -u DISPATCHER_COMMANDER_TOKEN \
  "${compose[@]}" --env-file /dev/null config --quiet >/dev/null 2>&1; then
  echo "check_compose: docker-compose.yml accepts missing DISPATCHER_CLIENT_TOKEN / DISPATCHER_COMMANDER_TOKEN" >&2
  exit 1
fi
# With them (placeholders unless set), the file must be valid.
export DISPATCHER_CLIENT_TOKEN=${DISPATCHER_CLIENT_TOKEN:-check-compose-client-token}
export DISPATCHER_COMMANDER_TOKEN=${DISPATCHER_COMMANDER_TOKEN:-check-compose-commander-token}
"${compose[@]}" config --quiet
echo "check_compose: docker-compose.yml is valid ($("${compose[@]}" version --short 2>/dev/null || echo plugin))"
