#!/bin/sh
# The worker image's entrypoint on hosts that pass credentials as environment
# variables (RunPod pods, from the template's secrets): each one present is
# written to a file readable by this user only, the matching TY_* key points
# at it, and the variable is removed from the environment the worker (and
# its trainers) see. Then the trainer paths written at build time, then the
# command.
#   TY_NKEY_SEED      the pool's role nkey seed (SU…)   → TY_NATS__NKEY_SEED_FILE
#   TY_NATS_CA_PEM    the CA of the NATS server's cert   → TY_NATS__TLS_CA_FILE
#   TY_SECRETS_KEY    the fleet key that opens job secrets → TY_SECRETS__KEY_FILE
# On RunPod their values are account secrets ({{ RUNPOD_SECRET_<name> }}),
# resolved by RunPod when the pod boots.
# Overridable (tests run this script outside a container):
#   TY_ENTRYPOINT_DIR     where the files go (default /run/trainyard)
#   TY_TRAINER_ENV_FILE   the trainer paths, sourced if present (default /opt/trainer.env)
set -eu
umask 077
dir=${TY_ENTRYPOINT_DIR:-/run/trainyard}
trainer_env=${TY_TRAINER_ENV_FILE:-/opt/trainer.env}
unset TY_ENTRYPOINT_DIR TY_TRAINER_ENV_FILE
mkdir -p "$dir"
if [ -n "${TY_NKEY_SEED:-}" ]; then
  printf '%s\n' "$TY_NKEY_SEED" > "$dir/nkey.seed"
  export TY_NATS__NKEY_SEED_FILE="$dir/nkey.seed"
fi
if [ -n "${TY_NATS_CA_PEM:-}" ]; then
  printf '%s\n' "$TY_NATS_CA_PEM" > "$dir/ca.pem"
  export TY_NATS__TLS_CA_FILE="$dir/ca.pem"
fi
if [ -n "${TY_SECRETS_KEY:-}" ]; then
  printf '%s\n' "$TY_SECRETS_KEY" > "$dir/secrets.key"
  export TY_SECRETS__KEY_FILE="$dir/secrets.key"
fi
unset TY_NKEY_SEED TY_NATS_CA_PEM TY_SECRETS_KEY
if [ -f "$trainer_env" ]; then
  . "$trainer_env"
fi
exec "$@"
