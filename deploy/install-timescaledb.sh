#!/usr/bin/env bash
# Install the TimescaleDB extension (Apache-2 edition) into the local Debian
# PostgreSQL cluster and make sure it is preloaded.
#
# Debian 13 (trixie): installs the binary package postgresql-$PG_MAJOR-timescaledb.
# Debian 12 (bookworm) or no binary package: builds the Debian trixie source
# package "timescaledb" with cmake against the local PostgreSQL.
#
# Idempotent: when the extension files of the wanted version are installed and
# the library is already preloaded, the script only runs a short verification.
#
# Environment overrides:
#   PG_MAJOR             PostgreSQL major version (default: detected)
#   PG_CLUSTER           Debian cluster name (default: detected, else "main")
#   PGHOST/PGPORT/PGUSER connection for checks (127.0.0.1 / 5432 / postgres)
#   TIMESCALEDB_VERSION  upstream version wanted (default: 2.19.3, as in trixie)
set -euo pipefail

export PGHOST="${PGHOST:-127.0.0.1}"
export PGPORT="${PGPORT:-5432}"
export PGUSER="${PGUSER:-postgres}"
export DEBIAN_FRONTEND=noninteractive
TIMESCALEDB_VERSION="${TIMESCALEDB_VERSION:-2.19.3}"
SRC_SUITE="trixie"
SRC_LIST="/etc/apt/sources.list.d/ingestd-trixie-src.sources"
PROBE_DB="tsdb_probe"

log() { printf 'install-timescaledb: %s\n' "$*"; }
die() { printf 'install-timescaledb: ERROR: %s\n' "$*" >&2; exit 1; }
psql_q() { PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }
# Debian version string -> upstream version (drop epoch, revision, +dfsg/~ suffix)
upstream_of() { local v="${1#*:}"; v="${v%-*}"; v="${v%%+*}"; printf '%s' "${v%%~*}"; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

# --- PostgreSQL major version / cluster ------------------------------------
if [ -z "${PG_MAJOR:-}" ] && command -v pg_lsclusters >/dev/null 2>&1; then
    # prefer the cluster listening on $PGPORT
    read -r PG_MAJOR detected_cluster < <(pg_lsclusters -h 2>/dev/null |
        awk -v p="$PGPORT" '$3 == p { print $1, $2; exit }') || true
    PG_CLUSTER="${PG_CLUSTER:-${detected_cluster:-}}"
fi
if [ -z "${PG_MAJOR:-}" ] && [ -d /etc/postgresql ]; then
    PG_MAJOR="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' |
        grep -E '^[0-9]+$' | sort -n | tail -n1 || true)"
fi
if [ -z "${PG_MAJOR:-}" ] && command -v pg_config >/dev/null 2>&1; then
    PG_MAJOR="$(pg_config --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
fi
[ -n "${PG_MAJOR:-}" ] || die "cannot detect the PostgreSQL major version; set PG_MAJOR"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"
[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (is postgresql-${PG_MAJOR} installed?)"
SHAREDIR="$("$PG_CONFIG" --sharedir)"
PKGLIBDIR="$("$PG_CONFIG" --pkglibdir)"
CONTROL="${SHAREDIR}/extension/timescaledb.control"
CONF_DIR="/etc/postgresql/${PG_MAJOR}/${PG_CLUSTER}"
DROPIN="${CONF_DIR}/conf.d/timescaledb.conf"
. /etc/os-release
log "${PRETTY_NAME:-unknown OS}, PostgreSQL ${PG_MAJOR} cluster ${PG_CLUSTER}, wanted TimescaleDB ${TIMESCALEDB_VERSION}"

installed_version() {
    [ -f "$CONTROL" ] || return 0
    sed -nE "s/^[[:space:]]*default_version[[:space:]]*=[[:space:]]*'([^']*)'.*/\1/p" "$CONTROL"
}
extension_installed() {
    [ "$(installed_version)" = "$TIMESCALEDB_VERSION" ] &&
        [ -f "${PKGLIBDIR}/timescaledb-${TIMESCALEDB_VERSION}.so" ]
}

# --- install -----------------------------------------------------------------
install_binary() { # $1 = package; returns 1 if no matching binary candidate
    local pkg="$1" cand
    cand="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        return 1
    fi
    if [ "$(upstream_of "$cand")" != "$TIMESCALEDB_VERSION" ]; then
        log "binary $pkg candidate is $cand, not ${TIMESCALEDB_VERSION}; building from source instead"
        return 1
    fi
    log "installing binary package $pkg=$cand"
    apt-get install -y -q --no-install-recommends "$pkg=$cand"
}

install_from_source() {
    if [ ! -f "$SRC_LIST" ]; then
        log "adding deb-src entry for ${SRC_SUITE}: $SRC_LIST"
        cat >"$SRC_LIST" <<EOF
# Added by ingestd deploy/install-timescaledb.sh (source packages only)
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: ${SRC_SUITE}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        log "apt-get update"
        apt-get update -q >/dev/null
    fi

    local srcver
    srcver="$(apt-cache showsrc --only-source timescaledb 2>/dev/null |
        awk '/^Version:/ { print $2 }' | while read -r v; do
            [ "$(upstream_of "$v")" = "$TIMESCALEDB_VERSION" ] && echo "$v"
        done | sort -V | tail -n1)"
    if [ -z "$srcver" ]; then
        die "no timescaledb ${TIMESCALEDB_VERSION} source package in apt (available: $(
            apt-cache showsrc --only-source timescaledb 2>/dev/null |
            awk '/^Version:/ { printf "%s ", $2 }')); set TIMESCALEDB_VERSION"
    fi

    log "installing build dependencies"
    apt-get install -y -q --no-install-recommends \
        cmake build-essential dpkg-dev libssl-dev "postgresql-server-dev-${PG_MAJOR}" >/dev/null

    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    log "fetching Debian source timescaledb=${srcver}"
    # run the download as root: _apt cannot write into a private mktemp dir
    (cd "$tmp" && apt-get source -q -o APT::Sandbox::User=root "timescaledb=${srcver}" >/dev/null)
    local srcdir
    srcdir="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)"
    [ -n "$srcdir" ] || die "apt-get source did not unpack timescaledb"

    log "building TimescaleDB ${TIMESCALEDB_VERSION} (Apache-only) with cmake"
    cmake -S "$srcdir" -B "$tmp/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DPG_CONFIG="$PG_CONFIG" \
        -DAPACHE_ONLY=1 \
        -DREGRESS_CHECKS=OFF \
        -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF >"$tmp/cmake.log" 2>&1 ||
        { tail -n 30 "$tmp/cmake.log" >&2; die "cmake configure failed"; }
    make -C "$tmp/build" -j"$(nproc)" install >"$tmp/make.log" 2>&1 ||
        { tail -n 30 "$tmp/make.log" >&2; die "build failed"; }

    rm -rf "$tmp"
    trap - EXIT
}

if extension_installed; then
    log "TimescaleDB ${TIMESCALEDB_VERSION} files already installed, skipping install"
else
    log "installed TimescaleDB version: '$(installed_version)', installing ${TIMESCALEDB_VERSION}"
    log "apt-get update"
    apt-get update -q >/dev/null
    install_binary "postgresql-${PG_MAJOR}-timescaledb" || install_from_source
    extension_installed || die "install finished but ${CONTROL} does not show ${TIMESCALEDB_VERSION}"
    log "TimescaleDB ${TIMESCALEDB_VERSION} installed into ${SHAREDIR}/extension"
fi

# --- cluster control ---------------------------------------------------------
use_systemctl() {
    [ "$(ps -p 1 -o comm= 2>/dev/null)" = "systemd" ] || ! command -v pg_ctlcluster >/dev/null 2>&1
}
cluster_ctl() { # start|restart
    if use_systemctl; then
        systemctl "$1" "postgresql@${PG_MAJOR}-${PG_CLUSTER}"
    else
        pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" "$PG_CLUSTER" "$1"
    fi
}
wait_ready() {
    local i
    for i in $(seq 1 30); do
        psql_q -d postgres -c 'select 1' >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "PostgreSQL at ${PGHOST}:${PGPORT} not reachable"
}

if ! psql_q -d postgres -c 'select 1' >/dev/null 2>&1; then
    log "cluster ${PG_MAJOR}/${PG_CLUSTER} not running, starting it"
    cluster_ctl start
    wait_ready
fi

# --- configuration -----------------------------------------------------------
[ -d "${CONF_DIR}/conf.d" ] || die "${CONF_DIR}/conf.d missing"
grep -Eq "^[[:space:]]*include_dir[[:space:]]*=?[[:space:]]*'conf\.d'" "${CONF_DIR}/postgresql.conf" ||
    die "include_dir = 'conf.d' is not active in ${CONF_DIR}/postgresql.conf"

# shared_preload_libraries as set by every config file except our drop-in
# (pg_file_settings re-reads the files; the last assignment wins)
existing="$(psql_q -d postgres -c "select setting from pg_file_settings
    where name = 'shared_preload_libraries' and sourcefile <> '${DROPIN}'
    order by seqno desc limit 1")"
libs=""
IFS=',' read -ra parts <<<"$existing"
for p in "${parts[@]}"; do
    p="${p//\"/}"
    p="${p#"${p%%[![:space:]]*}"}"
    p="${p%"${p##*[![:space:]]}"}"
    [ -z "$p" ] || [ "$p" = "timescaledb" ] && continue
    libs="${libs:+$libs,}$p"
done
libs="${libs:+$libs,}timescaledb"

want_conf="# Managed by ingestd deploy/install-timescaledb.sh
shared_preload_libraries = '${libs}'
timescaledb.telemetry_level = off"
conf_changed=0
if [ ! -f "$DROPIN" ] || [ "$(cat "$DROPIN")" != "$want_conf" ]; then
    log "writing ${DROPIN} (shared_preload_libraries = '${libs}')"
    printf '%s\n' "$want_conf" >"$DROPIN"
    chmod 0644 "$DROPIN"
    conf_changed=1
fi

# our drop-in must be the effective (last) assignment
last_src="$(psql_q -d postgres -c "select sourcefile from pg_file_settings
    where name = 'shared_preload_libraries' order by seqno desc limit 1")"
[ "$last_src" = "$DROPIN" ] ||
    die "shared_preload_libraries is overridden by ${last_src:-?} (ALTER SYSTEM / later conf.d file?)"

loaded="$(psql_q -d postgres -c 'show shared_preload_libraries')"
if printf '%s' "$loaded" | tr ',' '\n' | tr -d ' "' | grep -qx timescaledb; then
    log "timescaledb already in shared_preload_libraries ('${loaded}'), no restart needed"
    if [ "$conf_changed" -eq 1 ]; then
        psql_q -d postgres -c 'select pg_reload_conf()' >/dev/null
    fi
else
    log "restarting cluster ${PG_MAJOR}/${PG_CLUSTER} to load timescaledb"
    cluster_ctl restart
    wait_ready
fi

# --- verification ------------------------------------------------------------
psql_q -d postgres -c "drop database if exists ${PROBE_DB}"
psql_q -d postgres -c "create database ${PROBE_DB}"
ext_ver="$(psql_q -d "$PROBE_DB" -c 'create extension if not exists timescaledb' \
    -c "select extversion from pg_extension where extname = 'timescaledb'")"
license="$(psql_q -d "$PROBE_DB" -c 'show timescaledb.license')"
psql_q -d postgres -c "drop database ${PROBE_DB}"
log "OK: timescaledb extversion ${ext_ver}, license ${license}"
