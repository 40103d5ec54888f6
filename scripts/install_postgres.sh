#!/usr/bin/env sh
# The service tests run on a real PostgreSQL server too (tests/conftest.py
# starts a throwaway one). Installs the system's package when there is none.
set -eu
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
echo "installing PostgreSQL for the tests (system package)"
if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
elif command -v dnf >/dev/null 2>&1; then
    $SUDO dnf install -y -q postgresql-server
else
    echo "no apt-get or dnf here: install PostgreSQL (initdb, pg_ctl) with the system's package manager" >&2
    exit 1
fi
