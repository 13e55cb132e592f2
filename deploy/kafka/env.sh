# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this
# Shared settings for the local Kafka scripts; sourced by install.sh, start.sh and stop.sh.
# The Kafka version is pinned here and only here (pom.xml takes it as -Dkafka.version).

# The newest 4.x release. Checked here with aiokafka 0.14 (admin create_topics, idempotent
# acks=all producer, group consumer) and faust-streaming 0.15.3 (agents, tables, repartition,
# two workers sharing partitions); 4.1.2 (log4j 2.25.3) passed the same checks. Override with
# BK_KAFKA_VERSION (and BK_LOG4J_VERSION to the log4j-core that version brings) to try another.
BK_KAFKA_VERSION="${BK_KAFKA_VERSION:-4.4.0}"

# log4j-slf4j-impl must match the log4j-core that kafka-server pulls in for this version.
BK_LOG4J_VERSION="${BK_LOG4J_VERSION:-2.25.5}"

BK_KAFKA_HOME="${BK_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/besokskollen/kafka-$BK_KAFKA_VERSION}"
BK_KAFKA_DATA="${BK_KAFKA_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/besokskollen/kafka-data}"
BK_KAFKA_PORT="${BK_KAFKA_PORT:-9092}"
BK_KAFKA_CONTROLLER_PORT="${BK_KAFKA_CONTROLLER_PORT:-$((BK_KAFKA_PORT + 1))}"

# Marker written last by install.sh: its presence means libs/ is complete for this version.
BK_KAFKA_MARKER="$BK_KAFKA_HOME/.installed-$BK_KAFKA_VERSION"
