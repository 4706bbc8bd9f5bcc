#!/usr/bin/env bash
# Entry point of the `kafka` service (apache/kafka image): SASL logins from a secret file, the
# admin SCRAM user written into the metadata when the storage is formatted, then the image's
# own start script (/etc/kafka/docker/run).
#
# SCRAM credentials live in the KRaft metadata, so the first one can only be added by
# `kafka-storage format --add-scram` (KIP-900); the image formats without it. This script
# formats first (with the same properties the image renders from KAFKA_* variables) and the
# image's own format then finds the storage formatted and goes on.
#
# The password is read from KAFKA_ADMIN_PASSWORD_FILE (a compose secret, hex from
# `make secrets`) and reaches the broker as environment variables the image turns into
# properties; it never appears in the compose file.
set -euo pipefail

password_file="${ADMIN_PASSWORD_FILE:-/run/secrets/kafka_admin_password}"
admin="${ADMIN_USER:-admin}"
if [[ ! -s "$password_file" ]]; then
  echo "kafka: no admin password at $password_file (run \`make secrets\`)" >&2
  exit 1
fi
password="$(tr -d '\r\n' < "$password_file")"
if [[ ! "$password" =~ ^[A-Za-z0-9._~-]+$ ]]; then
  echo "kafka: the admin password must be [A-Za-z0-9._~-]+ (it goes into JAAS and --add-scram)" >&2
  exit 1
fi

# The broker's logins: SCRAM on the INTERNAL listener (clients and inter-broker), PLAIN on the
# loopback CONTROLLER listener (SCRAM cannot authenticate the controller: its credentials
# live in the metadata the controller serves). Property names: the image's rule, `_` -> `.`,
# `__` -> `_`, `___` -> `-`.
export KAFKA_LISTENER_NAME_INTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG="org.apache.kafka.common.security.scram.ScramLoginModule required username=\"${admin}\" password=\"${password}\";"
export KAFKA_LISTENER_NAME_CONTROLLER_PLAIN_SASL_JAAS_CONFIG="org.apache.kafka.common.security.plain.PlainLoginModule required username=\"${admin}\" password=\"${password}\" user_${admin}=\"${password}\";"

# The admin client's properties, for the healthcheck (this container only, mode 600): the
# client listener is SASL_SSL, its certificate signed by the CA at CA_FILE.
umask 077
cat > /tmp/admin.properties <<PROPS
security.protocol=SASL_SSL
ssl.truststore.type=PEM
ssl.truststore.location=${CA_FILE:-/run/secrets/kafka_ca}
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${admin}" password="${password}";
PROPS

# The server properties the image will render, for the format step: every KAFKA_* variable
# but the JVM and logging ones, by the image's naming rule.
render_properties() {
  local name value key
  while IFS='=' read -r name value; do
    case "$name" in
      KAFKA_VERSION | KAFKA_HEAP_OPTS | KAFKA_LOG4J_OPTS | KAFKA_OPTS | KAFKA_JMX_OPTS | \
      KAFKA_JVM_PERFORMANCE_OPTS | KAFKA_GC_LOG_OPTS | KAFKA_LOG4J_ROOT_LOGLEVEL | \
      KAFKA_LOG4J_LOGGERS | KAFKA_TOOLS_LOG4J_LOGLEVEL | KAFKA_JMX_HOSTNAME) continue ;;
      KAFKA_*) ;;
      *) continue ;;
    esac
    key="${name#KAFKA_}"
    key="${key,,}"
    key="${key//_/.}"
    key="${key//.../-}"
    key="${key//../_}"
    printf '%s=%s\n' "$key" "$value"
  done < <(env)
}
render_properties > /tmp/format.properties

: "${CLUSTER_ID:?CLUSTER_ID is required}"
/opt/kafka/bin/kafka-storage.sh format --cluster-id "$CLUSTER_ID" --config /tmp/format.properties \
  --add-scram "SCRAM-SHA-512=[name=${admin},password=${password}]" --ignore-formatted
rm -f /tmp/format.properties
umask 022

exec /etc/kafka/docker/run "$@"
