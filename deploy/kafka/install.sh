#!/usr/bin/env bash
# Install the Apache Kafka broker (jars only, no tarball) from Maven Central into
# $BK_KAFKA_HOME/libs. Maven Central is the only place Kafka's jars are served from here.
# Idempotent: exits at once when the marker for the pinned version is present.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$here/env.sh"

if [[ -f "$BK_KAFKA_MARKER" ]]; then
  echo "Kafka $BK_KAFKA_VERSION already installed in $BK_KAFKA_HOME"
  exit 0
fi

for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "install.sh: '$tool' not found on PATH" >&2; exit 1; }
done

mkdir -p "$BK_KAFKA_HOME"
# Download into a scratch folder and swap it in, so an interrupted run never
# leaves a half-filled libs/ that looks usable.
staging="$(mktemp -d "$BK_KAFKA_HOME/libs.tmp.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

echo "Resolving Kafka $BK_KAFKA_VERSION from Maven Central..."
# Output goes to a log shown only on failure (Debian's mvn 3.8 prints stray ANSI resets even with -q -B).
mvn_log="$staging/mvn.log"
if ! mvn -q -B -f "$here/pom.xml" \
  -Dkafka.version="$BK_KAFKA_VERSION" \
  -Dlog4j.version="$BK_LOG4J_VERSION" \
  dependency:copy-dependencies \
  -DincludeScope=runtime \
  -DoutputDirectory="$staging" >"$mvn_log" 2>&1; then
  cat "$mvn_log" >&2
  echo "install.sh: Maven could not resolve Kafka $BK_KAFKA_VERSION" >&2
  exit 1
fi
rm -f "$mvn_log"

# Sanity check: the broker entry point must be on the classpath we just built.
if [[ ! -f "$staging/kafka_2.13-$BK_KAFKA_VERSION.jar" ]]; then
  echo "install.sh: kafka_2.13-$BK_KAFKA_VERSION.jar missing after resolve" >&2
  exit 1
fi

rm -rf "$BK_KAFKA_HOME/libs"
mv "$staging" "$BK_KAFKA_HOME/libs"
trap - EXIT
touch "$BK_KAFKA_MARKER"

echo "Installed Kafka $BK_KAFKA_VERSION ($(find "$BK_KAFKA_HOME/libs" -name '*.jar' | wc -l) jars) in $BK_KAFKA_HOME/libs"
