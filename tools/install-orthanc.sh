#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin from Debian for the integration tests.
# Not orthanc-gdcm: it crashes intermittently on the first transcode (shared/recipes/orthanc.md §8.3).
# Safe under pipefail on a machine that lacks the package (tests/unit/tools/test_install_scripts.py
# runs it with a stubbed apt-get); the paths below are overridable for that test only.
set -euo pipefail
PLUGIN_DIR=${PACSFLOW_ORTHANC_PLUGIN_DIR:-/usr/share/orthanc/plugins}
POLICY_RC_D=${PACSFLOW_POLICY_RC_D:-/usr/sbin/policy-rc.d}
if command -v Orthanc >/dev/null 2>&1 && [ -e "$PLUGIN_DIR/libOrthancDicomWeb.so" ]; then
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# keep the package's postinst from starting a system Orthanc on 4242/8042
[ -e "$POLICY_RC_D" ] || { printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY_RC_D" >/dev/null; $SUDO chmod +x "$POLICY_RC_D"; }
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb
# no `| head -1`: head exits after one line and, under pipefail, Orthanc's SIGPIPE (141) failed
# the script right after a successful install
version=$(Orthanc --version)
echo "${version%%$'\n'*}"
