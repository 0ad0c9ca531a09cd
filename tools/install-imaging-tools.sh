#!/usr/bin/env bash
# Install the command-line tools some tests compare with or run, from Debian:
#   dcm2niix   the reference converter: live parity tests of 4D MR, gantry tilt (issue #21)
#   tesseract  the offline OCR that removes burned-in text (deid.clean_pixels, issue #21 §5)
# Tests that need them skip with the reason when they are absent; CI installs them.
# Safe under pipefail on a machine that lacks them (tests/unit/tools/test_install_scripts.py
# runs it with a stubbed apt-get).
set -euo pipefail
missing=()
command -v dcm2niix >/dev/null 2>&1 || missing+=(dcm2niix)
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr tesseract-ocr-eng)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# first lines only, read whole (no `| head`: under pipefail its SIGPIPE fails the script)
d=$(dcm2niix --version 2>&1 || true)
t=$(tesseract --version 2>&1)
echo "dcm2niix: ${d%%$'\n'*}"
echo "tesseract: ${t%%$'\n'*}"
