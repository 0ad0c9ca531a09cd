#!/usr/bin/env bash
# pacsflow's nightly run under cron (deploy/cron/pacsflow.cron calls it): loads the PACS
# credentials from an environment file that must be mode 0600, runs `pacsflow run`, keeps one
# log file per night, and exits with pacsflow's own status, so cron's mail (MAILTO) or any
# monitor sees a failure:
#   0 done  1 a stage failed or left work pending  2 config/usage  3 unavailable
#   4 no space left  130/143 interrupted (a rerun resumes)
# Settings (environment; defaults for the layout of README.md "Operator guide"):
#   PACSFLOW_HOME      the checkout with .venv (/opt/pacsflow)
#   PACSFLOW_ENV_FILE  KEY=value lines: PACS credentials, PACSFLOW_KEY_FILE (/etc/pacsflow/pacsflow.env)
#   PACSFLOW_CONFIG    the pipeline config (/etc/pacsflow/nightly.yaml)
#   PACSFLOW_LOG_DIR   where the nightly logs go (/var/log/pacsflow)
set -uo pipefail

home=${PACSFLOW_HOME:-/opt/pacsflow}
env_file=${PACSFLOW_ENV_FILE:-/etc/pacsflow/pacsflow.env}
config=${PACSFLOW_CONFIG:-/etc/pacsflow/nightly.yaml}
log_dir=${PACSFLOW_LOG_DIR:-/var/log/pacsflow}

if [[ ! -f $env_file ]]; then
    echo "pacsflow-nightly: no environment file $env_file" >&2
    exit 2
fi
mode=$(stat -c %a "$env_file")
if [[ $mode != 600 && $mode != 400 ]]; then
    echo "pacsflow-nightly: $env_file is mode $mode: it holds PACS credentials, make it 0600" >&2
    exit 2
fi
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a

umask 077
mkdir -p "$log_dir"
log="$log_dir/nightly-$(date +%Y%m%d-%H%M%S).log"
"$home/.venv/bin/pacsflow" --json-logs run "$config" >"$log" 2>&1
status=$?
if [[ $status -ne 0 ]]; then
    # cron mails what a job prints: the reason (pacsflow's one-line error) and where the log is
    echo "pacsflow nightly run failed (exit $status): $(grep '^pacsflow: ' "$log" | tail -n 1)"
    echo "log: $log"
fi
# keep 60 nights of logs
find "$log_dir" -name 'nightly-*.log' -mtime +60 -delete 2>/dev/null
exit "$status"
