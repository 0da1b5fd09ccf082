#!/usr/bin/env bash
# The test command: installs what the tests need (as root, on Debian), then
# runs every test: unit, property and integration tests against private
# Dovecot and Postfix instances started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets "$@"
