#!/usr/bin/env bash
# Stop the broker started by start.sh, by the pid in <data>/kafka.pid (never by process name,
# so other Kafka instances on the machine are left alone). Usage:
#   stop.sh [--data DIR]        (or BK_KAFKA_DATA)
set -euo pipefail

while (($#)); do
  case "$1" in
    --data) BK_KAFKA_DATA="${2:?--data needs a value}"; shift 2 ;;
    -h | --help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$here/env.sh"

pid_file="$BK_KAFKA_DATA/kafka.pid"
if [[ ! -f "$pid_file" ]]; then
  echo "Kafka not running (no $pid_file)"
  exit 0
fi
pid="$(<"$pid_file")"

# Only signal the pid if it is still a Kafka broker: after a crash the pid may be reused.
if ! { [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'kafka\.Kafka'; }; then
  echo "Kafka not running (stale pid $pid); removing $pid_file"
  rm -f "$pid_file"
  exit 0
fi

# A zombie (exited, not yet reaped by its new parent) still answers kill -0: count it as gone.
alive() { kill -0 "$1" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

# TERM lets Kafka flush logs and write a clean-shutdown marker, which keeps the next
# start fast (no log recovery).
kill -TERM "$pid" 2>/dev/null || true
deadline=$((SECONDS + ${BK_KAFKA_STOP_TIMEOUT:-15}))
while alive "$pid" && ((SECONDS < deadline)); do
  sleep 0.2
done
if alive "$pid"; then
  echo "Kafka pid $pid did not stop within ${BK_KAFKA_STOP_TIMEOUT:-15}s; sending KILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 5))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
fi

rm -f "$pid_file"
echo "Kafka stopped (pid $pid)"
