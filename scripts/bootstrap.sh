#!/bin/sh
# Set up synthaug in ./.venv on a fresh machine.
#   sh scripts/bootstrap.sh        package and its dependencies
#   sh scripts/bootstrap.sh test   ... plus the test dependencies
# It also installs the Fashion-MNIST data (Debian package dataset-fashion-mnist) when it is
# missing and this is a Debian-like system run as root; otherwise it says what to do.
set -eu
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST is not installed. On Debian/Ubuntu run: sudo apt-get install dataset-fashion-mnist" >&2
    echo "      elsewhere pass --data DIR (a folder with the four IDX files) to the synthaug commands." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "error: synthaug needs Python >= 3.10 (torch 2.14); python3 is $(python3 --version 2>&1)" >&2
    exit 1
  fi
  if ! python3 -m venv .venv; then
    rm -rf .venv
    echo "error: could not create a virtual environment. On Debian/Ubuntu: sudo apt-get install python3-venv" >&2
    exit 1
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$extras"
echo "synthaug is installed in $(pwd)/.venv"
