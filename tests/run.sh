#!/usr/bin/env bash
# Installs everything the test suite needs (the package with its test extras, Apache Kafka from
# Maven Central) and runs the whole suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install --quiet -e '.[test]'
deploy/kafka/install.sh
# The tracker's browser test drives Debian's Chromium (tests/test_tracker.py).
if ! command -v chromium >/dev/null; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# pytest exits 5 when it collected nothing: that is a broken setup, never a pass.
status=0
python3 -m pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "tests/run.sh: pytest collected no tests" >&2
fi
exit "$status"
