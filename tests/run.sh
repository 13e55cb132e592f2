#!/usr/bin/env bash
# Installs everything the test suite needs (the package with its test extras, Apache Kafka from
# Maven Central) and runs the whole suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install --quiet -e '.[test]'
deploy/kafka/install.sh
# Debian packages the suite drives: Chromium for the tracker's browser test (tests/test_tracker.py),
# redis-server for the shared rate limit (tests/test_operations.py).
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# docker-compose 1.x (for `docker-compose config` on deploy/compose.yml) pins libraries older than
# the suite's, so it gets a venv of its own; its PyYAML 5.4 builds only with Cython < 3.
compose_venv="$HOME/.cache/besokskollen/compose-venv"
if [[ ! -x "$compose_venv/bin/docker-compose" ]]; then
  python3 -m venv "$compose_venv"
  "$compose_venv/bin/pip" install --quiet "cython<3" wheel setuptools
  "$compose_venv/bin/pip" install --quiet --no-build-isolation "pyyaml==5.4.1"
  "$compose_venv/bin/pip" install --quiet "docker-compose==1.29.2"
fi

# pytest exits 5 when it collected nothing: that is a broken setup, never a pass.
# The slowest tests are listed at the end: where the suite's time goes, in every CI log.
status=0
python3 -m pytest --durations=20 "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "tests/run.sh: pytest collected no tests" >&2
fi
exit "$status"
