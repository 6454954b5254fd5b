#!/usr/bin/env bash
# Services some tests start for themselves: a PostgreSQL server (tests/tune/test_postgres_workers.py
# runs a throwaway cluster with initdb/pg_ctl) and its Python driver. Tests skip when these are missing.
set -euo pipefail
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
    fi
fi
python -m pip install --quiet psycopg2-binary
