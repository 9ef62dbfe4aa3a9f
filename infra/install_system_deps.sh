#!/usr/bin/env bash
# System packages the project needs beyond PyPI, installed from Debian's archive when missing:
# - a Java runtime for pycocoevalcap (PTB tokenizer, METEOR, SPICE)
# - chromium for the browser tests of the manifest browser (driven through Playwright's Python API)
set -euo pipefail
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
# The browser test launches exactly this path (tests/integration/test_browser_chromium.py), so check it, not $PATH.
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  # Not fatal here: `make test` exports BLIP_REQUIRE_BROWSER=1, so the browser test then fails, naming it.
  echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2
  exit 0
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
