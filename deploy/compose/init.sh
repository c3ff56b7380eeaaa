#!/bin/sh
# One-shot set-up of the compose demo, run by the `keyplane-init` service as the
# image's unprivileged user: the agent CA with a server certificate for `keyplaned`,
# the PIN sealing key, the schema, and (once) a demo dealer and site whose agent
# credentials go to $DATA/agent/ for the agent container. Everything lands in the
# keyplane-data volume, never in an image. Idempotent: keys are never overwritten.
set -eu

data=/var/lib/keyplane
umask 077

if [ ! -f "$data/ca/ca.key" ]; then
    keyplaned ca-init --out "$data/ca" --server-name keyplaned --server-name localhost
fi
if [ ! -f "$data/pin.key" ]; then
    keyplaned keygen --out "$data/pin.key"
fi
keyplaned migrate

if [ -f "$data/agent/site" ]; then
    echo "demo site already seeded: $(cat "$data/agent/site")"
    exit 0
fi

token=$(keyplaned bootstrap-dealer --display-name "compose demo dealer" | sed -n 's/^token: //p')
printf '%s\n' "$token" >"$data/dealer.token"

# demo-seed speaks plaintext, which keyplaned serves on loopback only: a private
# instance inside this container, stopped once the site exists.
keyplaned serve --listen 127.0.0.1:50052 --pin-key-file "$data/pin.key" \
    --ca-key-file "$data/ca/ca.key" &
server=$!
tries=0
until seed=$(KEYPLANE_TOKEN="$token" keyplaned demo-seed --server 127.0.0.1:50052); do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        kill "$server"
        echo "keyplane-init: the private keyplaned did not answer in 30 s" >&2
        exit 1
    fi
    sleep 1
done
kill "$server"
wait "$server" || true

# The agent's files: readable by the agent container's own user.
umask 022
mkdir -p "$data/agent"
cp "$data/ca/ca.crt" "$data/agent/ca.crt"
printf '%s\n' "$seed" | sed -n 's/^agent_token: //p' >"$data/agent/agent.token"
chmod 0644 "$data/agent/agent.token"
printf '%s\n' "$seed" | sed -n 's/^site: //p' >"$data/agent/site"
echo "demo site: $(cat "$data/agent/site")"
echo "dealer token: docker compose exec keyplaned cat $data/dealer.token"
