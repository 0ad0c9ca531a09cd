#!/usr/bin/env bash
# Install Debian's Chromium and its driver for the review browser test
# (tests/e2e/test_review_browser.py drives the system browser with Selenium; nothing downloads).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version
