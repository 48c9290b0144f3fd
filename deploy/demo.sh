#!/usr/bin/env bash
# `make demo`: a local database and broker, ingestd, and a simulated fleet, for DEMO_SECONDS
# (default 60; 0 runs until Ctrl-C). Prints what is being ingested and where the metrics are.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_SECONDS="${DEMO_SECONDS:-60}"
DEMO_METERS="${DEMO_METERS:-50}"
DEMO_INTERVAL="${DEMO_INTERVAL:-5}"
# Uplink loss, so that gaps open and are filled by replay from the meters' flash.
DEMO_DROP="${DEMO_DROP:-0.02}"
STATE=var/demo
mkdir -p "$STATE"
BIN=.venv/bin

# The database: a role and a database of the demo's own, with a password, so that it works
# with Debian's default pg_hba.conf (scram over TCP) as well as with trust.
if [ ! -s "$STATE/db-password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/db-password")
fi
password="$(cat "$STATE/db-password")"
as_postgres() { if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi; }
as_postgres psql -X -q -v ON_ERROR_STOP=1 -d postgres <<SQL
SELECT 'CREATE ROLE ingestd_demo LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ingestd_demo')\gexec
ALTER ROLE ingestd_demo PASSWORD '$password';
SELECT 'CREATE DATABASE ingestd_demo OWNER ingestd_demo' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'ingestd_demo')\gexec
-- The least-privilege roles (docs/security.md), which 'ingestd migrate' grants; the demo
-- itself runs as its one role, the owner of everything.
SELECT format('CREATE ROLE %I NOLOGIN', r) FROM unnest(ARRAY['ingestd_daemon', 'ingestd_operator', 'ingestd_billing', 'ingestd_admin']) AS r
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r)\gexec
SET client_min_messages = warning;  -- "already a member", on every run but the first
GRANT ingestd_operator TO ingestd_billing, ingestd_admin;
SQL
# The extension needs a superuser to create; the migration then finds it in place.
as_postgres psql -X -q -v ON_ERROR_STOP=1 -d ingestd_demo -c "CREATE EXTENSION IF NOT EXISTS timescaledb"

# The broker: a private Mosquitto with our queue settings (see deploy/mosquitto/demo.conf).
if ! (exec 3<>/dev/tcp/127.0.0.1/1884) 2>/dev/null; then
    sed "s|^persistence_file .*|persistence_file mosquitto-demo.db\npersistence_location $PWD/$STATE/|" \
        deploy/mosquitto/demo.conf >"$STATE/mosquitto.conf"
    mosquitto -d -c "$STATE/mosquitto.conf"
fi

export INGESTD_DATABASE_URL="postgresql://ingestd_demo@127.0.0.1:5432/ingestd_demo"
export INGESTD_DATABASE_PASSWORD_FILE="$STATE/db-password"
export INGESTD_MQTT_URL="mqtt://127.0.0.1:1884"
export INGESTD_MQTT_CLIENT_ID="ingestd-demo"
export INGESTD_METRICS_ADDR="127.0.0.1:9108"
export INGESTD_LOG_FORMAT="${INGESTD_LOG_FORMAT:-console}"
# The head-end's key signs replay requests; the simulated meters check them with it.
[ -s "$STATE/headend.pem" ] || $BIN/ingestd keygen --alg ES256 --out "$STATE/headend.pem" >/dev/null
export INGESTD_HEADEND_KEY_FILE="$STATE/headend.pem"
export INGESTD_HEADEND_KID="demo-headend"
export INGESTD_HEADEND_INSTANCE="demo"
export INGESTD_GAPS_GRACE_S=10
export INGESTD_GAPS_RETRY_INITIAL_S=15

$BIN/ingestd migrate
$BIN/ingestd run >"$STATE/ingestd.log" 2>&1 &
daemon=$!
$BIN/ingestd simulate --meters "$DEMO_METERS" --interval "$DEMO_INTERVAL" --state "$STATE/simulator" \
    --drop "$DEMO_DROP" --tamper 0.002 \
    >"$STATE/simulator.log" 2>&1 &
simulator=$!
cleanup() {
    kill -TERM "$simulator" 2>/dev/null || true
    wait "$simulator" 2>/dev/null || true
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat <<INFO
ingestd demo: $DEMO_METERS simulated meters (every signature algorithm), one message each every ${DEMO_INTERVAL}s
  metrics    http://127.0.0.1:9108/metrics
  database   psql "postgresql://ingestd_demo@127.0.0.1:5432/ingestd_demo"  (password in $STATE/db-password)
  logs       $STATE/ingestd.log, $STATE/simulator.log
INFO

export PGPASSWORD="$password"
started=$SECONDS
while kill -0 "$daemon" 2>/dev/null; do
    sleep 5
    psql -X -At -F ' ' "$INGESTD_DATABASE_URL" -c "
        SELECT 'readings', count(*) FROM readings
        UNION ALL SELECT 'events', count(*) FROM events
        UNION ALL SELECT 'rejected', count(*) FROM quarantine
        UNION ALL SELECT 'meters heard', count(DISTINCT meter_id) FROM message_seqs
        UNION ALL SELECT 'gaps open', count(*) FROM gaps WHERE status IN ('open', 'requested')
        UNION ALL SELECT 'gaps filled', count(*) FROM gaps WHERE status = 'filled'" |
        awk -v t="$((SECONDS - started))" '{ v[NR] = $NF } END { printf "[%3ds] readings %s  events %s  rejected %s  meters heard %s  gaps open %s  filled %s\n", t, v[1], v[2], v[3], v[4], v[5], v[6] }'
    if [ "$DEMO_SECONDS" -gt 0 ] && [ $((SECONDS - started)) -ge "$DEMO_SECONDS" ]; then
        break
    fi
done
kill -0 "$daemon" 2>/dev/null || { echo "ingestd stopped; last log lines:"; tail -n 20 "$STATE/ingestd.log"; exit 1; }
echo "latest readings:"
psql -X "$INGESTD_DATABASE_URL" -c "SELECT meter_id, time, import_wh, export_wh FROM readings ORDER BY received_at DESC, meter_id LIMIT 5"
echo "meters needing attention (ingestd status):"
$BIN/ingestd status || true
