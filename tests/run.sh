#!/usr/bin/env bash
# The README's test command: from a fresh machine to a passing test suite.
# It makes the virtual environment .venv, installs pixel-server with its test extra (compiling
# the _fastcount extension; a failed compile fails here), then runs pytest with any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The viewability tests drive Debian's chromium through Playwright, which cannot download a
# browser here.
if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"  # apt-get needs root
    fi
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
exec .venv/bin/python -m pytest "$@"
