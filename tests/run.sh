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

# Two parts: every test but the few marked `alone` on two processes (pytest-xdist; a test that
# waits for a broker or a worker leaves the other core to a test of its own), then those few with
# nothing beside them, since they assert latencies and recovery times.
# pytest exits 5 when it collected nothing: that is a broken setup, never a pass (with arguments
# that narrow the run, one part may select nothing, not both). The slowest tests are listed at
# the end of each part: where the suite's time goes, in every CI log.
parallel=0 alone=0
python3 -m pytest -n 2 --dist worksteal -m "not alone" --durations=20 "$@" || parallel=$?
python3 -m pytest -m alone --durations=5 "$@" || alone=$?
if [[ $parallel -eq 5 && $alone -eq 5 ]] || [[ $# -eq 0 && ($parallel -eq 5 || $alone -eq 5) ]]; then
  echo "tests/run.sh: pytest collected no tests" >&2
  exit 5
fi
for status in "$parallel" "$alone"; do
  [[ $status -eq 0 || $status -eq 5 ]] || exit "$status"
done
