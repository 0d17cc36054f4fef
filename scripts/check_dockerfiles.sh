#!/usr/bin/env bash
# Checks, without a Docker engine, that the Dockerfiles build what the
# Makefile builds:
#  - dispatcher_go/Dockerfile: runs its own `go build` steps (taken from the
#    file, not copied here) and compares the binaries' module lists with
#    `make build`'s bin/dispatcher and bin/dispatchctl; they must be static.
#  - commander/Dockerfile: builds the wheel from exactly the files the
#    Dockerfile copies, and compares its console scripts with pyproject.toml.
# `make images` builds the real images where a Docker engine runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- dispatcher: the RUN steps that call `go build`, continuation lines joined.
steps=$(awk '
  /^RUN / { cmd = substr($0, 5); while (cmd ~ /\\$/) { sub(/\\$/, "", cmd); getline line; cmd = cmd line } if (cmd ~ /go build/) print cmd }
' dispatcher_go/Dockerfile)
[[ -n $steps ]] || { echo "check_dockerfiles: no go build step in dispatcher_go/Dockerfile" >&2; exit 1; }
(cd dispatcher_go && VERSION=dev && export VERSION && eval "${steps//\/out/$tmp}")
for b in dispatcher dispatchctl; do
  [[ -x bin/$b ]] || { echo "check_dockerfiles: bin/$b missing (make build)" >&2; exit 1; }
  mods() { go version -m "$1" | awk '$1 == "path" || $1 == "mod" || $1 == "dep" { print $1, $2, $3 }' | sort; }
  if ! diff <(mods "bin/$b") <(mods "$tmp/$b") >"$tmp/$b.diff"; then
    echo "check_dockerfiles: the image's $b differs from make build's:" >&2
    cat "$tmp/$b.diff" >&2
    exit 1
  fi
  if go version -m "$tmp/$b" | grep -q 'CGO_ENABLED=1'; then
    echo "check_dockerfiles: the image's $b is not static (distroless/static base)" >&2
    exit 1
  fi
  { "$tmp/$b" --help 2>&1 || true; } | grep -qi usage || { echo "check_dockerfiles: $b --help prints no usage" >&2; exit 1; }
done
echo "check_dockerfiles: dispatcher_go/Dockerfile builds dispatcher and dispatchctl from the same main packages and modules as make build (static)"

# --- commander: the wheel from the files the Dockerfile copies.
ctx=$tmp/commander-ctx
mkdir -p "$ctx"
while read -r src dst; do
  cp -r "$src" "$ctx/$dst"
done < <(awk '/^COPY / && $0 !~ /--from/ { n = NF; for (i = 2; i < n; i++) print $i, $n }' commander/Dockerfile)
rm -rf "$ctx"/commander/tests "$ctx"/commander/__pycache__ "$ctx"/localsandbox/tests "$ctx"/localsandbox/__pycache__
"$ROOT/.venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$tmp/wheel" "$ctx" >/dev/null
whl=$(ls "$tmp"/wheel/*.whl)
got=$("$ROOT/.venv/bin/python" - "$whl" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
ep = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
lines = z.read(ep).decode().splitlines()
print(" ".join(sorted(l.split("=")[0].strip() for l in lines if "=" in l)))
missing = [m for m in ("commander/_gen/dispatch/v1/interaction_pb2.py", "localsandbox/__init__.py",
                       "commander/gui/__init__.py", "commander/sandbox/__init__.py") if m not in z.namelist()]
if missing:
    sys.exit(f"wheel lacks {missing}")
EOF
)
want=$("$ROOT/.venv/bin/python" -c '
import tomllib; print(" ".join(sorted(tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"])))')
[[ $got == "$want" ]] || { echo "check_dockerfiles: image console scripts '$got', pyproject '$want'" >&2; exit 1; }
echo "check_dockerfiles: commander/Dockerfile's files build the package with console scripts: $got"
