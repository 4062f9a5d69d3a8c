#!/usr/bin/env bash
# Starts the local Postgres and NATS (JetStream) when they are down. Idempotent.
# Postgres: 127.0.0.1:5432 (trust auth), NATS: 127.0.0.1:4222 with JetStream.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 100); do
    if port_open "$port"; then return 0; fi
    sleep 0.1
  done
  echo "error: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

# Trust auth for TCP from this machine (127.0.0.1 and ::1), ahead of the packaged rules (the first
# matching line wins; Debian's own asks for a password, scram-sha-256). Idempotent: the marker line
# says it is done.
TRUST_MARKER="# switchboard scripts/dev-services.sh: trust auth for local TCP"
trust_local_tcp() {
  local hba=$1
  if grep -qF "$TRUST_MARKER" "$hba"; then return 0; fi
  local new
  new=$(printf '%s\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n\n' "$TRUST_MARKER"; cat "$hba")
  # Written into the same file: its owner and mode stay.
  printf '%s\n' "$new" >"$hba"
}

if port_open 5432; then
  # A running server is left as it is, configuration included.
  echo "postgres: up"
else
  installed_here=false
  if ! ls /etc/postgresql >/dev/null 2>&1; then
    echo "postgres: not installed; installing from Debian packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    installed_here=true
  fi
  cluster="$(ls /etc/postgresql | head -n1)"
  if [ "$installed_here" = true ]; then
    echo "postgres: trust auth for 127.0.0.1 and ::1"
    trust_local_tcp "/etc/postgresql/$cluster/main/pg_hba.conf"
  fi
  if port_open 5432; then
    # The package started the cluster itself: it reads pg_hba.conf again.
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main reload
  else
    echo "postgres: starting"
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
  fi
  wait_port 5432 postgres
fi

if port_open 4222; then
  echo "nats: up"
else
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    echo "nats: not installed; installing from Debian packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
  echo "nats: starting"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222 nats
fi
