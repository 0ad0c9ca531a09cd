#!/usr/bin/env bash
# Install Debian's Chromium and its driver for the review browser test
# (tests/e2e/test_review_browser.py drives the system browser with Selenium; nothing downloads).
# Safe under pipefail on a machine that lacks the package (tests/unit/tools/test_install_scripts.py
# runs it with a stubbed apt-get); the paths below are overridable for that test only.
set -euo pipefail
CHROMIUM=${PACSFLOW_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${PACSFLOW_CHROMEDRIVER:-/usr/bin/chromedriver}
if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
version=$("$CHROMIUM" --version)
echo "${version%%$'\n'*}"
