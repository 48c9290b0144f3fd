#!/usr/bin/env bash
# Start the local PostgreSQL cluster and Mosquitto if they are not running, for `make demo`
# and `make bench`. Works with and without systemd (containers, CI).
set -euo pipefail
PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
MQTT_PORT="${MQTT_PORT:-1883}"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if port_open "$PGHOST" "$PGPORT"; then
    echo "services: PostgreSQL is running on $PGHOST:$PGPORT"
else
    echo "services: starting PostgreSQL"
    if [ -d /run/systemd/system ]; then
        systemctl start postgresql
    else
        version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -n | tail -n1)"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
fi

if port_open 127.0.0.1 "$MQTT_PORT"; then
    echo "services: Mosquitto is running on 127.0.0.1:$MQTT_PORT"
else
    echo "services: starting Mosquitto"
    if [ -d /run/systemd/system ]; then
        systemctl start mosquitto
    else
        mosquitto -d -c /etc/mosquitto/mosquitto.conf
    fi
fi
