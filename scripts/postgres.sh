#!/usr/bin/env bash
# Throwaway PostgreSQL for tests and benchmarks.
#
#   scripts/postgres.sh start    install postgresql (Debian) if missing, start a
#                                cluster on a free loopback port under a temp
#                                dir, print its connection string (stdout, one line)
#   scripts/postgres.sh dsn      print the connection string of the running cluster
#   scripts/postgres.sh stop     stop the cluster and remove its directory
#   scripts/postgres.sh kill     stop the server at once (immediate mode: no
#                                checkpoint, clients cut off), keeping its data
#   scripts/postgres.sh restart  start the killed server again, same port, data
#                                and settings (those of its start, kept in the
#                                state dir: the environment of the restart,
#                                e.g. PG_SYNCHRONOUS_COMMIT, is not read)
#
# PG_SYNCHRONOUS_COMMIT=on makes a commit wait for its WAL write: the fault
# tests kill the server and need every acknowledged commit to survive (with
# the default, off, the last few hundred ms of commits are lost on a kill).
#
# PG_DURABLE=1 runs the cluster with a real deployment's durability:
# fsync=on, synchronous_commit=on, full_page_writes=on, so a commit is on
# disk before it is acknowledged and an event a watcher was sent survives a
# crash of PostgreSQL or of the machine. The fleet's latency benchmark
# (scripts/bench_fleet.py) uses it: figures measured with fsync off are not
# a fleet's. Settings it adds that change speed only, never what a commit
# guarantees: wal_level=minimal and max_wal_senders=0 (less WAL written;
# no replica or archive reads it here), checkpoint_timeout=30min and
# max_wal_size=4GB (no checkpoint, with its burst of writes and of
# full-page images in the WAL, during a run: crash recovery may take
# longer, it loses nothing), commit_delay=0 (the default: no wait for
# group commit).
#
# PG_EXTRA_OPTS adds server settings ("-c name=value ..."), to compare
# settings in a benchmark (later ones win).
#
# Idempotent: start while running prints the same DSN; stop when stopped is a
# no-op. The server runs as an unprivileged user (postgres refuses root):
# when run as root, as the "postgres" system user via runuser. State lives in
# $PG_STATE_DIR (default /tmp/agentdispatch-pg), trust auth, loopback only.
set -euo pipefail

STATE_DIR="${PG_STATE_DIR:-/tmp/agentdispatch-pg}"
RUN_USER="${PG_RUN_USER:-postgres}"
DB_NAME="dispatcher"

log() { echo "postgres.sh: $*" >&2; }

pg_bindir() {
	local d
	d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
	[[ -n "$d" && -x "$d/initdb" ]] && echo "$d"
}

install_pg() {
	if [[ -n "$(pg_bindir)" ]]; then return; fi
	if [[ $(id -u) -ne 0 ]]; then
		log "postgresql is not installed and we are not root: apt-get install postgresql"
		exit 1
	fi
	log "installing postgresql from Debian"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends postgresql >&2
	# The package may start its own cluster on 5432; we do not use it.
}

as_user() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u "$RUN_USER" -- "$@"
	else
		"$@"
	fi
}

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

dsn() {
	local port user
	port=$(cat "$STATE_DIR/port")
	user=$(cat "$STATE_DIR/user")
	echo "postgres://${user}@127.0.0.1:${port}/${DB_NAME}?sslmode=disable"
}

running() {
	[[ -f "$STATE_DIR/port" && -d "$STATE_DIR/data" ]] || return 1
	as_user "$(pg_bindir)/pg_ctl" -D "$STATE_DIR/data" status >/dev/null 2>&1
}

# server_opts are the server settings the environment asks for.
server_opts() {
	local opts
	if [[ "${PG_DURABLE:-}" == 1 ]]; then
		opts="-c fsync=on -c synchronous_commit=on -c full_page_writes=on -c wal_level=minimal -c max_wal_senders=0 -c checkpoint_timeout=30min -c max_wal_size=4GB -c commit_delay=0"
	else
		opts="-c fsync=off -c synchronous_commit=${PG_SYNCHRONOUS_COMMIT:-off} -c full_page_writes=off"
	fi
	echo "$opts ${PG_EXTRA_OPTS:-}"
}

pg_start() {
	local bin=$1 port=$2 opts=$3
	as_user "$bin/pg_ctl" -D "$STATE_DIR/data" -l "$STATE_DIR/server.log" -w -t 60 \
		-o "-c listen_addresses=127.0.0.1 -p $port -k $STATE_DIR $opts -c max_connections=200" \
		start >&2 || { cat "$STATE_DIR/server.log" >&2; exit 1; }
}

# For fault tests: the server goes away like a crash, its data stays.
kill_server() {
	[[ -d "$STATE_DIR/data" ]] || { log "no cluster in $STATE_DIR"; exit 1; }
	as_user "$(pg_bindir)/pg_ctl" -D "$STATE_DIR/data" -m immediate -w stop >&2
}

restart_server() {
	[[ -f "$STATE_DIR/port" && -d "$STATE_DIR/data" ]] || { log "no cluster in $STATE_DIR"; exit 1; }
	if running; then return; fi
	local opts
	# The settings of the start: a fault test's restart (fleet.sh's
	# synchronous_commit=on) must not fall back to the defaults.
	if [[ -f "$STATE_DIR/opts" ]]; then
		opts=$(cat "$STATE_DIR/opts")
	else
		opts=$(server_opts)
	fi
	pg_start "$(pg_bindir)" "$(cat "$STATE_DIR/port")" "$opts"
}

start() {
	install_pg
	local bin user port
	bin=$(pg_bindir)
	if running; then
		dsn
		return
	fi
	rm -rf "$STATE_DIR"
	mkdir -p "$STATE_DIR"
	user=$(id -un)
	if [[ $(id -u) -eq 0 ]]; then
		user="$RUN_USER"
		chown "$RUN_USER" "$STATE_DIR"
	fi
	port=$(free_port)
	as_user "$bin/initdb" -D "$STATE_DIR/data" -U "$user" --auth=trust --no-sync -E UTF8 >"$STATE_DIR/initdb.log" 2>&1 ||
		{ cat "$STATE_DIR/initdb.log" >&2; exit 1; }
	echo "$port" >"$STATE_DIR/port"
	echo "$user" >"$STATE_DIR/user"
	# Throwaway cluster: fsync off makes tests fast; never use for real data.
	server_opts >"$STATE_DIR/opts"
	pg_start "$bin" "$port" "$(cat "$STATE_DIR/opts")"
	as_user "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$user" "$DB_NAME"
	log "started on 127.0.0.1:$port (state in $STATE_DIR)"
	dsn
}

stop() {
	local bin
	bin=$(pg_bindir || true)
	if [[ -n "$bin" && -d "$STATE_DIR/data" ]]; then
		as_user "$bin/pg_ctl" -D "$STATE_DIR/data" -m fast -w stop >&2 2>&1 || true
	fi
	rm -rf "$STATE_DIR"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
kill) kill_server ;;
restart) restart_server ;;
dsn) running && dsn || { log "not running"; exit 1; } ;;
*) echo "usage: $0 start|stop|kill|restart|dsn" >&2; exit 2 ;;
esac
