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
for pkg in libopencv-dev libturbojpeg0-dev libjpeg-dev pkg-config; do  # libjpeg-dev: jpeglib.h for pipelines/_cropdecode.cpp
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

# Re-install only when the declared dependencies or the compiled crop decoder (setup.py builds
# pipelines/_cropdecode.cpp) changed since the last successful install.
want=$(cat pyproject.toml setup.py pipelines/_cropdecode.cpp | sha256sum | cut -d' ' -f1)
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

# DALI ships one wheel per CUDA major version (nvidia-dali-cuda110/120/130) and must match the CUDA
# that torch was built with, so it is chosen here from the torch just installed, not pinned. A
# CPU-only torch gets the newest flavour: DALI's CPU operators (device_id=None) need no CUDA.
cuda_major=$("$VENV/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
case "$cuda_major" in
  13 | "") dali=nvidia-dali-cuda130 ;;
  12) dali=nvidia-dali-cuda120 ;;
  11) dali=nvidia-dali-cuda110 ;;
  *) dali="" ;;
esac
if [ -z "$dali" ]; then
  echo "setup: torch uses CUDA $cuda_major, for which there is no DALI wheel: the dali pipeline will be unavailable"
else
  # Another flavour (an older install, or one a dependency list pulled in) would shadow this one.
  others=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -io '^nvidia-dali-cuda[0-9]*' \
    | grep -vix "$dali" || true)
  if [ -n "$others" ]; then
    echo "setup: removing DALI built for another CUDA: $others"
    "$VENV/bin/python" -m pip uninstall -q -y $others
  fi
  echo "setup: torch uses CUDA ${cuda_major:-none}: installing $dali"
  "$VENV/bin/python" -m pip install -q "$dali"
fi
echo "$want" > "$stamp"
echo "setup: done"
