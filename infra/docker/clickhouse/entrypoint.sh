#!/usr/bin/env bash
# Entry point of the `clickhouse` service: the app user's password from a secret file, then
# the image's own entry point (/entrypoint.sh), which creates CLICKHOUSE_USER with
# CLICKHOUSE_PASSWORD and CLICKHOUSE_DB. The password never appears in the compose file.
set -euo pipefail

password_file="${PASSWORD_FILE:-/run/secrets/clickhouse_password}"
if [[ ! -s "$password_file" ]]; then
  echo "clickhouse: no password at $password_file (run \`make secrets\`)" >&2
  exit 1
fi
CLICKHOUSE_PASSWORD="$(tr -d '\r\n' < "$password_file")"
export CLICKHOUSE_PASSWORD

exec /entrypoint.sh "$@"
