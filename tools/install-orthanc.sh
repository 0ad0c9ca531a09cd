#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin from Debian for the integration tests.
# Not orthanc-gdcm: it crashes intermittently on the first transcode (shared/recipes/orthanc.md §8.3).
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# keep the package's postinst from starting a system Orthanc on 4242/8042
[ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d; }
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb
Orthanc --version | head -1
