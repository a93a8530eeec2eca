#!/usr/bin/env bash
# One-time, idempotent set-up: the system libraries FFCV compiles against, a virtual
# environment, and the project installed into it (editable, with the dev and energy extras).
# A second run that finds everything in place returns in a few seconds.
#
# Choices, by environment variable (README, "Installing on a GPU node"):
#   SUPMAE_TORCH_INDEX=URL  pip index for torch/torchvision, to pick their CUDA build
#                           (e.g. https://download.pytorch.org/whl/cu128); default: PyPI's build
#   SUPMAE_DALI=PKG|none    the DALI wheel (default: the flavour matching torch's CUDA)
#   SUPMAE_NO_APT=1         no apt: the libraries below must already be found by pkg-config
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SUPMAE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.supmae-installed"
TORCH_INDEX=${SUPMAE_TORCH_INDEX:-}
DALI_CHOICE=${SUPMAE_DALI:-auto}

# What FFCV and pipelines/_cropdecode.cpp compile and link against: OpenCV (opencv4), libturbojpeg and
# libjpeg's jpeglib.h, found through pkg-config.
libs_found() {
  command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg \
    && { pkg-config --exists libjpeg || [ -f /usr/include/jpeglib.h ] || [ -n "$(ls /usr/include/*/jpeglib.h 2>/dev/null)" ]; }
}
missing_libs="setup: FFCV and the crop decoder need OpenCV, libturbojpeg and libjpeg development files found by pkg-config"
if [ "${SUPMAE_NO_APT:-0}" = 1 ]; then
  libs_found || { echo "$missing_libs (not found; see the README's 'Installing on a GPU node')" >&2; exit 1; }
else
  need_apt=()
  for pkg in libopencv-dev libturbojpeg0-dev libjpeg-dev pkg-config; do  # libjpeg-dev: jpeglib.h for pipelines/_cropdecode.cpp
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
  done
  if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      if ! command -v apt-get >/dev/null || ! command -v sudo >/dev/null; then
        echo "$missing_libs: apt-get install ${need_apt[*]} as root, or install them another way and rerun with SUPMAE_NO_APT=1" >&2
        exit 1
      fi
      SUDO="sudo"
    fi
    echo "setup: installing system packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi

# Re-install only when the declared dependencies or the compiled crop decoder (setup.py builds
# pipelines/_cropdecode.cpp) changed since the last successful install.
want=$({ cat pyproject.toml setup.py pipelines/_cropdecode.cpp; echo "$TORCH_INDEX $DALI_CHOICE"; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing the project and its dependencies into $VENV (first time: several minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
# FFCV's setup.py imports numpy and finds OpenCV/libjpeg-turbo through pkg-config, so numpy comes
# first and FFCV is built without build isolation.
"$VENV/bin/python" -m pip install -q numpy cython pkgconfig
"$VENV/bin/python" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch>=2.11" "torchvision>=0.26"
"$VENV/bin/python" -m pip install -q --no-build-isolation "ffcv==1.0.2"
"$VENV/bin/python" -m pip install -q -e '.[dev,energy]'

# DALI ships one wheel per CUDA major version (nvidia-dali-cuda110/120/130) and must match the CUDA
# that torch was built with, so it is chosen here from the torch just installed, not pinned. A
# CPU-only torch gets the newest flavour: DALI's CPU operators (device_id=None) need no CUDA.
# DALI 2.4 is the version the dali pipeline is tested with; it has wheels for CUDA 12 and 13 only.
cuda_major=$("$VENV/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
case "$DALI_CHOICE:$cuda_major" in
  none:*) dali="" ;;
  auto:13 | auto:) dali=nvidia-dali-cuda130 ;;
  auto:12) dali=nvidia-dali-cuda120 ;;
  auto:*) dali="" ;;
  *) dali=$DALI_CHOICE ;;
esac
if [ -z "$dali" ]; then
  echo "setup: no DALI (torch's CUDA: ${cuda_major:-none}, SUPMAE_DALI=$DALI_CHOICE): the dali pipeline will be unavailable"
else
  # Another flavour (an older install, or one a dependency list pulled in) would shadow this one.
  others=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -io '^nvidia-dali-cuda[0-9]*' \
    | grep -vix "$dali" || true)
  if [ -n "$others" ]; then
    echo "setup: removing DALI built for another CUDA: $others"
    "$VENV/bin/python" -m pip uninstall -q -y $others
  fi
  echo "setup: torch uses CUDA ${cuda_major:-none}: installing $dali"
  "$VENV/bin/python" -m pip install -q "$dali>=2.4"
fi
echo "$want" > "$stamp"
echo "setup: done"
