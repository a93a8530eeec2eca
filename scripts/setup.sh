#!/usr/bin/env bash
# One-time, idempotent set-up: the system libraries FFCV compiles against, a virtual
# environment, and the project installed into it (editable, with the dev extra).
# A second run that finds everything in place returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SUPMAE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.supmae-installed"

need_apt=()
for pkg in libopencv-dev libturbojpeg0-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi

# Re-install only when the declared dependencies changed since the last successful install.
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing the project and its dependencies into $VENV (first time: several minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
# FFCV's setup.py imports numpy and finds OpenCV/libjpeg-turbo through pkg-config, so numpy comes
# first and FFCV is built without build isolation.
"$VENV/bin/python" -m pip install -q numpy cython pkgconfig
"$VENV/bin/python" -m pip install -q torch torchvision
"$VENV/bin/python" -m pip install -q --no-build-isolation ffcv
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "$want" > "$stamp"
echo "setup: done"
