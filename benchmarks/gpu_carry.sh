#!/usr/bin/env bash
# Carry DALI to a lent GPU machine that has no network and no DALI (Python 3.12, torch with CUDA 13).
#
#   bash benchmarks/gpu_carry.sh download   # here, with network: wheels -> .whl/part-NN/ (each < 60 MB)
#   bash benchmarks/gpu_carry.sh install    # there, once every part has arrived: join, check, pip --no-index
#
# One device call carries at most 64 MB of ignored files, and the DALI wheel alone is several times that,
# so `download` packs every wheel (DALI for CUDA 13, its nvimgcodec / nvcomp / nvjpeg libraries and the
# pure-Python packages it imports) into one tar, split into parts of PART_MB, each in its own folder
# .whl/part-NN/ so that one call can carry exactly one part (`carry: [".whl/part-03"]`). Parts carried by
# earlier calls stay on a warm machine. `install` joins them, checks the joined tar against the SHA-256
# recorded at download time (a missing or truncated part fails here, by name, not inside pip), and installs
# with `pip install --no-index`, so nothing is fetched there. Then gpu_check.sh's dali part runs on its own.
set -euo pipefail

cd "$(dirname "$0")/.."
WHL=.whl
PY="${PYTHON:-python3}"
PART_MB="${PART_MB:-55}"
PY_VERSION="${CARRY_PYTHON_VERSION:-3.12}"
# The DALI flavour follows the CUDA of torch on the GPU image (13); nvjpeg is named apart because
# nvimgcodec loads it at run time without declaring it.
PACKAGES=(nvidia-dali-cuda130 nvidia-nvjpeg)
# The DALI and nvimgcodec wheels are tagged manylinux_2_28, nvcomp 2_27, nvjpeg 2014 (2_17): pip's
# --platform matches tags exactly, so each one is named.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

download() {
    rm -rf "$WHL/wheels" "$WHL"/part-* "$WHL/carry.tar"
    mkdir -p "$WHL/wheels"
    local plat=()
    for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    "$PY" -m pip download --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        "${plat[@]}" --dest "$WHL/wheels" "${PACKAGES[@]}"
    tar -cf "$WHL/carry.tar" -C "$WHL" wheels
    local sum
    sum=$(sha256sum "$WHL/carry.tar" | cut -d' ' -f1)
    split -b "${PART_MB}M" -d -a 2 "$WHL/carry.tar" "$WHL/carry.tar.part-"
    local n=0
    for f in "$WHL"/carry.tar.part-*; do
        local idx="${f##*-}"
        mkdir -p "$WHL/part-$idx"
        mv "$f" "$WHL/part-$idx/"
        n=$((n + 1))
    done
    # Every part folder holds the manifest, so whichever arrives last, install finds it.
    for d in "$WHL"/part-*; do
        printf 'sha256 %s\nparts %s\npackages %s\n' "$sum" "$n" "${PACKAGES[*]}" > "$d/MANIFEST"
    done
    rm -f "$WHL/carry.tar"
    echo "gpu_carry: $(ls "$WHL/wheels" | wc -l) wheels, $(du -sb "$WHL/wheels" | cut -f1) bytes, in $n parts:"
    du -b "$WHL"/part-*/carry.tar.part-* | awk '{printf "  %s %.1f MB\n", $2, $1 / 1e6}'
    echo "send each with one call (carry: [\"$WHL/part-NN\"]) to one warm machine, then: bash $0 install"
}

install() {
    local manifest
    manifest=$(ls "$WHL"/part-*/MANIFEST 2>/dev/null | head -1 || true)
    [ -n "$manifest" ] || { echo "gpu_carry: no parts in $WHL (carry .whl/part-NN first)" >&2; exit 2; }
    local want sum n
    want=$(awk '$1 == "parts" {print $2}' "$manifest")
    sum=$(awk '$1 == "sha256" {print $2}' "$manifest")
    n=$(ls "$WHL"/part-*/carry.tar.part-* | wc -l)
    if [ "$n" -ne "$want" ]; then
        echo "gpu_carry: $n of $want parts here; missing:" >&2
        for i in $(seq -f %02g 0 $((want - 1))); do [ -f "$WHL/part-$i/carry.tar.part-$i" ] || echo "  part-$i" >&2; done
        exit 2
    fi
    cat "$WHL"/part-*/carry.tar.part-* > "$WHL/carry.tar"
    echo "$sum  $WHL/carry.tar" | sha256sum -c --quiet || { echo "gpu_carry: joined tar is corrupt" >&2; exit 2; }
    tar -xf "$WHL/carry.tar" -C "$WHL"
    rm -f "$WHL/carry.tar"
    local pkgs
    pkgs=$(awk '$1 == "packages" {$1 = ""; print}' "$manifest")
    # shellcheck disable=SC2086 # the package list is meant to split into words
    "$PY" -m pip install --no-index --find-links "$WHL/wheels" $pkgs
    "$PY" -c "import nvidia.dali as d; print('gpu_carry: DALI', d.__version__, 'installed')"
}

case "${1:-}" in
    download) download ;;
    install) install ;;
    *) echo "usage: bash $0 download|install" >&2; exit 2 ;;
esac
