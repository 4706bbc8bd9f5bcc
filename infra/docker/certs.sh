#!/usr/bin/env bash
# `make certs`: the compose stack's certificates, under DIR (default ./secrets), made with the
# openssl command (EC P-256). Each pair is kept when present; delete its files to make it anew.
#
#   tls/server.crt, tls/server.key    the proxy's (nginx) self-signed certificate, 825 days;
#                                     NAMES adds subjectAltName entries to it, e.g.
#                                     "DNS:keypulse.example.com,IP:10.0.0.5" (localhost and
#                                     127.0.0.1 are always in). For anything but a trial,
#                                     replace it by one from a real CA (same file names).
#   kafka-tls/ca.crt, ca.key          a private CA for the broker, 10 years
#   kafka-tls/server.pem              the broker's key (PKCS#8), its certificate (DNS:kafka,
#                                     825 days) and the CA's, the PEM keystore Kafka reads
#
# The files that containers read are 644 inside the 700 directory (see secrets.sh); the
# private keys no container reads (the proxy's, read by nginx as root, and the CA's) are 600.
set -euo pipefail

dir="${1:-secrets}"
names="${2:-}"
umask 077
mkdir -p "$dir/tls" "$dir/kafka-tls"
chmod 700 "$dir"
[[ -e "$dir/.gitignore" ]] || printf '*\n' > "$dir/.gitignore"  # never committed

ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

tls="$dir/tls"
if [[ -s "$tls/server.crt" && -s "$tls/server.key" ]]; then
  echo "kept $tls/server.crt and $tls/server.key"
else
  san="DNS:localhost,IP:127.0.0.1${names:+,$names}"
  openssl req -x509 "${ec[@]}" -days 825 -subj "/CN=keypulse" -addext "subjectAltName=$san" \
    -keyout "$tls/server.key" -out "$tls/server.crt" 2>/dev/null
  chmod 644 "$tls/server.crt"
  echo "made $tls/server.crt ($san) and $tls/server.key"
fi

kafka="$dir/kafka-tls"
if [[ -s "$kafka/ca.crt" && -s "$kafka/server.pem" ]]; then
  echo "kept $kafka/ca.crt and $kafka/server.pem"
else
  openssl req -x509 "${ec[@]}" -days 3650 -subj "/CN=keypulse Kafka CA" \
    -keyout "$kafka/ca.key" -out "$kafka/ca.crt" 2>/dev/null
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  openssl req -new "${ec[@]}" -subj "/CN=kafka" -keyout "$work/server.key" \
    -out "$work/server.csr" 2>/dev/null
  printf '%s\n' "subjectAltName=DNS:kafka,DNS:localhost,IP:127.0.0.1" \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" > "$work/ext"
  openssl x509 -req -in "$work/server.csr" -CA "$kafka/ca.crt" -CAkey "$kafka/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$work/ext" \
    -out "$work/server.crt" 2>/dev/null
  cat "$work/server.key" "$work/server.crt" "$kafka/ca.crt" > "$kafka/server.pem"
  chmod 644 "$kafka/ca.crt" "$kafka/server.pem"
  echo "made $kafka/ca.crt and $kafka/server.pem (DNS:kafka)"
fi
