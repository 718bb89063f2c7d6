#!/bin/sh
# Installs Debian's headless-capable Chromium for the explorer's browser tests
# (tests/test_report_explorer.py). The tests drive it with Playwright-for-Python (the `test` extra)
# through `executable_path=/usr/bin/chromium`: Playwright's own browser download is never used.
set -eu
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
/usr/bin/chromium --version
python -c "import playwright.sync_api" 2>/dev/null || python -m pip install -q "playwright>=1.40"
