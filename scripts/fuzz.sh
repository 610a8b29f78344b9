#!/usr/bin/env bash
# A longer search for inputs that break the parsers of user-supplied bytes (tests/hostile.rs):
# the suite runs each property 256 times; this runs them CASES times (default 100000) in
# release. A failure is kept by proptest in tests/hostile.proptest-regressions: commit it, so
# that the suite replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}
PROPTEST_CASES=${CASES:-100000} cargo test --release --test hostile
