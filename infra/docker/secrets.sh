#!/usr/bin/env bash
# `make secrets`: the compose stack's secrets as files under DIR (default ./secrets), made
# once. An existing file is kept: the Kafka admin's SCRAM credential is written into the
# broker's metadata on its first start, so a new value would lock the stack out of its own
# broker (rotate it with kafka-configs.sh first, then replace the file).
#
# Values are 32 random bytes as hex (64 characters): no character needs quoting in a DSN,
# a JAAS line or `kafka-storage format --add-scram`. Files hold the bare value, no newline.
#
# DIR is mode 700 (other users of this machine cannot list or read it); the files in it are
# 644 because Docker Compose (without Swarm) bind-mounts a secret file as it is, ignoring
# the `uid`/`mode` of a secret, and each container reads it as its own non-root user.
set -euo pipefail

dir="${1:-secrets}"
umask 077
mkdir -p "$dir/kafka-users"
chmod 700 "$dir"
[[ -e "$dir/.gitignore" ]] || printf '*\n' > "$dir/.gitignore"  # never committed

random() { openssl rand -hex 32 | tr -d '\n'; }

make_secret() {  # make_secret NAME [VALUE]
  local file="$dir/$1"
  if [[ -s "$file" ]]; then
    echo "kept $file"
    return
  fi
  if [[ $# -ge 2 ]]; then printf '%s' "$2" > "$file"; else random > "$file"; fi
  chmod 644 "$file"
  echo "made $file"
}

make_secret jwt_secret
make_secret kafka_admin_password
for principal in keypulse-api keypulse-ws keypulse-pipeline; do
  make_secret "kafka-users/$principal"
done
make_secret clickhouse_password
make_secret clickhouse_analyst_password
# The app's DSN carries the app user's password: made from that file, never typed.
make_secret clickhouse_dsn "http://keypulse:$(cat "$dir/clickhouse_password")@clickhouse:8123/keypulse"
