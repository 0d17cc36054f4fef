#!/usr/bin/env bash
# Throwaway Redis (Debian's redis-server) for the fleet, its tests and benchmarks.
#
#   scripts/redis.sh start    install redis-server (Debian) if missing, start a
#                             server on a free loopback port under a state dir,
#                             print its URL (stdout, one line)
#   scripts/redis.sh url      print the URL of the running server
#   scripts/redis.sh stop     stop the server and remove its directory
#   scripts/redis.sh kill     kill -9 the server (no save), keeping its state dir
#   scripts/redis.sh restart  start the killed server again on the same port
#                             (empty: persistence is off, as after a failover
#                             to a replica that had not caught up)
#
# Idempotent: start while running prints the same URL; stop when stopped is a
# no-op. Persistence is off (no RDB, no AOF): the fleet treats Redis as a bus
# that can lose everything; PostgreSQL is the truth. State lives in
# $REDIS_STATE_DIR (default /tmp/agentdispatch-redis); REDIS_PORT picks the port.
set -euo pipefail

STATE_DIR="${REDIS_STATE_DIR:-/tmp/agentdispatch-redis}"

log() { echo "redis.sh: $*" >&2; }

install_redis() {
	command -v redis-server >/dev/null 2>&1 && return
	if [[ $(id -u) -eq 0 ]]; then
		as_root=()
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		as_root=(sudo -n)
	else
		log "redis-server is not installed and we are not root: apt-get install redis-server"
		exit 1
	fi
	log "installing redis-server from Debian"
	export DEBIAN_FRONTEND=noninteractive
	"${as_root[@]}" apt-get update -qq >&2
	"${as_root[@]}" apt-get install -y -qq --no-install-recommends redis-server >&2
	# The package may start its own server on 6379 under systemd; we do not use it.
}

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

url() { echo "redis://127.0.0.1:$(cat "$STATE_DIR/port")/0"; }

running() {
	[[ -f "$STATE_DIR/pid" ]] && kill -0 "$(cat "$STATE_DIR/pid")" 2>/dev/null
}

server_start() {
	local port=$1
	redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
		--protected-mode yes --daemonize yes --dir "$STATE_DIR" \
		--pidfile "$STATE_DIR/pid" --logfile "$STATE_DIR/server.log" >&2
	for _ in $(seq 1 100); do
		if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then return; fi
		sleep 0.05
	done
	cat "$STATE_DIR/server.log" >&2
	log "redis-server did not answer on port $port"
	exit 1
}

start() {
	install_redis
	if running; then
		url
		return
	fi
	rm -rf "$STATE_DIR"
	mkdir -p "$STATE_DIR"
	local port=${REDIS_PORT:-$(free_port)}
	echo "$port" >"$STATE_DIR/port"
	server_start "$port"
	log "started on 127.0.0.1:$port (state in $STATE_DIR)"
	url
}

kill_server() {
	running || { log "not running"; return; }
	kill -9 "$(cat "$STATE_DIR/pid")"
	rm -f "$STATE_DIR/pid"
}

restart_server() {
	[[ -f "$STATE_DIR/port" ]] || { log "no server in $STATE_DIR"; exit 1; }
	running && return
	server_start "$(cat "$STATE_DIR/port")"
}

stop() {
	if running; then
		kill "$(cat "$STATE_DIR/pid")" 2>/dev/null || true
		for _ in $(seq 1 100); do running || break; sleep 0.05; done
	fi
	rm -rf "$STATE_DIR"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
kill) kill_server ;;
restart) restart_server ;;
url) running && url || { log "not running"; exit 1; } ;;
*) echo "usage: $0 start|stop|kill|restart|url" >&2; exit 2 ;;
esac
