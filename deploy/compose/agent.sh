#!/bin/sh
# Starts the demo agent with the site and agent token that keyplane-init wrote
# (mounted read-only at /seed); the server, its CA and the device directories
# come from the environment (compose.yaml).
set -eu
site=$(cat /seed/site)
exec keyplane-agent --site "$site" --token-file /seed/agent.token
