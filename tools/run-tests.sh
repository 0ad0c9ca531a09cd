#!/usr/bin/env bash
# Run the whole test suite: the README's `make test` and CI's .ci/run both end here.
# Fails on any failure, and on a run that executed no test (pytest exit 5).
# When possible, pytest runs inside a fresh network namespace holding only loopback, so
# Orthanc (which cannot bind to 127.0.0.1 only) and Dask are reachable from nowhere else.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
args=(-m pytest -p no:cacheprovider --durations=30 "$@")
if [ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null \
   && unshare -n true 2>/dev/null && [ "${PACSFLOW_NO_NETNS:-}" = "" ]; then
  echo "run-tests: pytest in a loopback-only network namespace"
  unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "$PY" "${args[@]}"
  rc=$?
else
  echo "run-tests: pytest in the host network (no unshare available)"
  "$PY" "${args[@]}"
  rc=$?
fi
if [ "$rc" -eq 5 ]; then
  echo "run-tests: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
