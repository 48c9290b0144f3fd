#!/usr/bin/env bash
# Install the Debian packages named on the command line, if any is missing.
# Safe to run twice: with everything installed it only asks dpkg.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: all of $* installed"
    exit 0
fi
echo "system-deps: installing ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
