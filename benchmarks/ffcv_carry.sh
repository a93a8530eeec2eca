#!/usr/bin/env bash
# Carry FFCV and our crop decoder to a lent GPU machine that has no network, no FFCV and no OpenCV or
# libjpeg-turbo development files (Python 3.12, torch with CUDA 13, gcc; see ../shared/DESIGN.md "GPU work").
#
#   bash benchmarks/ffcv_carry.sh pack       # here (apt + pip registries): -> .ffcv_carry/ (one `carry` entry)
#   eval "$(bash benchmarks/ffcv_carry.sh install)"   # there, first thing in the call: build, check, export
#   bash benchmarks/ffcv_carry.sh rehearse   # here, as root: `install` in a clean venv with the system's
#                                            # OpenCV / libjpeg headers, libraries and pkg-config hidden
#
# `pack` fills .ffcv_carry/ with two files: MANIFEST (what is inside, and the newest glibc / libstdc++ symbol
# versions the carried libraries use) and carry.tar.xz, which holds
#   lib/       the shared libraries of Debian bookworm's OpenCV 4.6 core + imgproc, libturbojpeg, libjpeg62-turbo
#              and everything they load that a bare Ubuntu lacks (tbb, lapack/blas, gfortran, GLX, X11...), each
#              file under its SONAME (no symlinks: `install` makes the four link-time names);
#   include/   their headers (OpenCV's opencv_modules.hpp cut down to core + imgproc, the only modules carried);
#   bin/pkg-config  a stand-in answering for opencv4, libturbojpeg and libjpeg from the carried folders: FFCV's
#              setup.py and ours both ask pkg-config, and the image may not have one;
#   src/ffcv-1.0.2/ FFCV's sdist (its sha256 is in MANIFEST) less docs, assets, examples and test data;
#   wheels/    `wheel` (pure Python), put on the build's path only when the image's setuptools is older than 70.1
#              and cannot build a wheel by itself;
#   stub_include/Python.h  used only when the image's Python has no headers: libffcv.cpp takes nothing from
#              Python.h but its dummy module's PyModuleDef / PyModule_Create, which the stand-in declares from
#              CPython's stable ABI.
# No other wheel is carried: of FFCV's install_requires the image lacks terminaltables, pytorch_pfn_extras,
# fastargs and assertpy, and none of them is imported by what the product uses (pytorch_pfn_extras only by the
# cupy path of NormalizeImage, the others by FFCV's benchmarks and examples), so FFCV is installed --no-deps.
# Hence nothing here depends on the Python version (the rehearsal's 3.11 and the image's 3.12 build the same).
#
# `install` unpacks to $FFCV_CARRY_ROOT (/tmp/ffcv_carry), checks glibc, libstdc++, gcc/g++ and Python.h,
# builds FFCV with pip --no-index --no-build-isolation --no-deps into $FFCV_SITE (/tmp/ffcv_site) and
# pipelines/_cropdecode in place (setup.py build_ext --inplace), both at once, linked with an RPATH (DT_RPATH,
# which also serves the carried libraries' own dependencies) to the carried lib/, so nothing needs
# LD_LIBRARY_PATH; then it imports FFCV, decodes one JPEG with FFCV's decoder and with ours and checks that the
# OpenCV / libjpeg-turbo in the process are the carried ones. Progress and seconds per step go to stderr; the
# only line on stdout is the `export PYTHONPATH=...` to eval, so a caller does
#   envline=$(bash benchmarks/ffcv_carry.sh install) && eval "$envline"
# Any failure exits 1 with the last line "ffcv_carry: install failed at STEP: REASON" on stderr.
# Rehearsal options: REHEARSE_OLD_SETUPTOOLS=1 (the venv's setuptools 65: the carried `wheel` is used),
# REHEARSE_NO_PYTHON_H=1 (Python's headers hidden too: the stand-in is used).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
CARRY="${FFCV_CARRY:-.ffcv_carry}"
FFCV_VERSION=1.0.2
WHEEL_VERSION=0.45.1 # the last `wheel` without dependencies
# Debian bookworm packages: runtime libraries, then the ones only their headers come from.
RUNTIME_DEBS=(libopencv-core406 libopencv-imgproc406 libturbojpeg0 libjpeg62-turbo
    libtbb12 libglx0 libglvnd0 libx11-6 libxau6 libxcb1 libxdmcp6 libbsd0 libmd0
    libblas3 liblapack3 libgfortran5 libquadmath0)
DEV_DEBS=(libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev libjpeg62-turbo-dev)
# Libraries every Ubuntu/Debian image with a compiler and Python has; the carried ones may need only these.
ASSUMED=(libc.so.6 libm.so.6 libstdc++.so.6 libgcc_s.so.1 libz.so.1 ld-linux-x86-64.so.2
    libpthread.so.0 libdl.so.2 librt.so.1)
# The link-time names (-lX) the two builds ask for, made as symlinks by `install`.
DEV_LINKS=(libopencv_core.so:libopencv_core.so.406 libopencv_imgproc.so:libopencv_imgproc.so.406
    libturbojpeg.so:libturbojpeg.so.0 libjpeg.so:libjpeg.so.62)

say() { echo "ffcv_carry: $*" >&2; }
now() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/,/.}"; else date +%s.%N; fi; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------- pack

# The pkg-config stand-in, written into DIR/bin/pkg-config; it finds the carry from its own location.
write_shim() {
    mkdir -p "$1/bin"
    cat > "$1/bin/pkg-config" <<'EOF'
#!/bin/sh
# pkg-config stand-in for the carried OpenCV 4.6 (core, imgproc), libturbojpeg and libjpeg (benchmarks/ffcv_carry.sh)
top=$(cd "$(dirname "$0")/.." && pwd)
I="-I$top/include/opencv4 -I$top/include" L="-L$top/lib"
want_i=0 want_L=0 want_l=0 mode=flags pkgs=
for a in "$@"; do
    case $a in
        --cflags|--cflags-only-I) want_i=1 ;;
        --libs) want_L=1 want_l=1 ;;
        --libs-only-L) want_L=1 ;;
        --libs-only-l) want_l=1 ;;
        --exists) mode=exists ;;
        --modversion) mode=version ;;
        --version) echo 0.29.2; exit 0 ;;
        -*) ;;
        *) pkgs="$pkgs $a" ;;
    esac
done
out=
for p in $pkgs; do
    case $p in
        opencv4|opencv) v=4.6.0 l="-lopencv_imgproc -lopencv_core" ;;
        libturbojpeg) v=2.1.5 l=-lturbojpeg ;;
        libjpeg) v=2.1.5 l=-ljpeg ;;
        *) echo "Package $p was not found in the pkg-config search path (ffcv_carry's stand-in knows opencv4, libturbojpeg, libjpeg)" >&2; exit 1 ;;
    esac
    [ $mode = version ] && echo $v
    [ $want_i = 1 ] && out="$out $I"
    [ $want_L = 1 ] && out="$out $L"
    [ $want_l = 1 ] && out="$out $l"
done
[ $mode = flags ] && echo $out
exit 0
EOF
    chmod +x "$1/bin/pkg-config"
}

# A stand-in for Python.h, used only when the image's Python has no headers: libffcv.cpp needs Python.h for
# nothing but its dummy module (PyModuleDef, PyModule_Create, PyMODINIT_FUNC), all of CPython's stable ABI.
write_python_h() {
    mkdir -p "$1/stub_include"
    cat > "$1/stub_include/Python.h" <<'EOF'
/* ffcv_carry's stand-in for Python.h: the stable-ABI pieces FFCV's libffcv.cpp uses for its dummy module. */
#ifndef FFCV_CARRY_PYTHON_H
#define FFCV_CARRY_PYTHON_H
#include <stddef.h>
#include <sys/types.h>
#ifdef __cplusplus
extern "C" {
#endif
typedef ssize_t Py_ssize_t;
typedef struct _object { Py_ssize_t ob_refcnt; void *ob_type; } PyObject;
typedef PyObject *(*PyCFunction)(PyObject *, PyObject *);
typedef struct PyMethodDef { const char *ml_name; PyCFunction ml_meth; int ml_flags; const char *ml_doc; } PyMethodDef;
typedef struct PyModuleDef_Base { PyObject ob_base; PyObject *(*m_init)(void); Py_ssize_t m_index; PyObject *m_copy; } PyModuleDef_Base;
#define PyModuleDef_HEAD_INIT { { 1, NULL }, NULL, 0, NULL }
typedef struct PyModuleDef {
    PyModuleDef_Base m_base; const char *m_name; const char *m_doc; Py_ssize_t m_size; PyMethodDef *m_methods;
    void *m_slots; void *m_traverse; void *m_clear; void *m_free;
} PyModuleDef;
PyObject *PyModule_Create2(PyModuleDef *, int);
#define PyModule_Create(def) PyModule_Create2(def, 1013)
#ifdef __cplusplus
}
#define PyMODINIT_FUNC extern "C" __attribute__((visibility("default"))) PyObject *
#else
#define PyMODINIT_FUNC __attribute__((visibility("default"))) PyObject *
#endif
#endif
EOF
}

pack() {
    command -v apt-get > /dev/null && command -v dpkg-deb > /dev/null && command -v objdump > /dev/null \
        || { say "pack needs apt-get, dpkg-deb and objdump (binutils): run it on Debian bookworm"; exit 2; }
    local t0 tmp stage new
    t0=$(now)
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: tmp is local
    trap "rm -rf '$tmp'" EXIT
    stage="$tmp/stage"
    mkdir -p "$tmp/debs" "$tmp/root" "$stage"/{lib,include,src,wheels}
    chmod 777 "$tmp/debs" # apt's _apt user downloads into it

    (cd "$tmp/debs" && apt-get download "${RUNTIME_DEBS[@]}" "${DEV_DEBS[@]}" > "$tmp/apt.log" 2>&1) || {
        tail -5 "$tmp/apt.log" >&2
        say "apt-get download failed (Debian bookworm's package names; try apt-get update)"
        exit 1
    }
    local deb
    for deb in "$tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done

    # Headers: OpenCV core + imgproc, libturbojpeg, libjpeg62-turbo (jconfig.h from the multiarch folder).
    cp -r "$tmp/root/usr/include/opencv4" "$stage/include/"
    cp "$tmp"/root/usr/include/*.h "$tmp"/root/usr/include/x86_64-linux-gnu/*.h "$stage/include/"
    # opencv.hpp (which FFCV includes) includes every module opencv_modules.hpp names: only the carried two.
    sed -i -E '/#define HAVE_OPENCV_/{/HAVE_OPENCV_(CORE|IMGPROC)$/!d}' "$stage/include/opencv4/opencv2/opencv_modules.hpp"

    # Libraries: every real file, under its SONAME (the .a and the dev symlinks stay behind).
    local f soname
    while IFS= read -r f; do
        soname=$(objdump -p "$f" | awk '$1 == "SONAME" { print $2 }')
        [ -n "$soname" ] && cp "$f" "$stage/lib/$soname"
    done < <(find "$tmp/root/usr/lib" -type f -name 'lib*.so.*')
    # The closure: everything a carried library needs is carried or assumed.
    local missing=() need
    for f in "$stage"/lib/*; do
        for need in $(objdump -p "$f" | awk '$1 == "NEEDED" { print $2 }'); do
            [ -e "$stage/lib/$need" ] || [[ " ${ASSUMED[*]} " == *" $need "* ]] || missing+=("$(basename "$f")->$need")
        done
    done
    [ ${#missing[@]} -eq 0 ] || { say "carried libraries need what is neither carried nor assumed: ${missing[*]}"; exit 1; }
    local glibc glibcxx cxxabi
    glibc=$(objdump -T "$stage"/lib/* | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
    glibcxx=$(objdump -T "$stage"/lib/* | grep -o 'GLIBCXX_[0-9][0-9.]*' | sed 's/GLIBCXX_//' | sort -uV | tail -1)
    cxxabi=$(objdump -T "$stage"/lib/* | grep -o 'CXXABI_[0-9][0-9.]*' | sed 's/CXXABI_//' | sort -uV | tail -1)

    write_shim "$stage"
    write_python_h "$stage"

    # FFCV's sdist (pip prepares its metadata by running setup.py, which asks pkg-config: the stand-in answers).
    PATH="$stage/bin:$PATH" "$PY" -m pip download --no-deps --no-binary=:all: --dest "$tmp/sdist" \
        "ffcv==$FFCV_VERSION" > "$tmp/pip.log" 2>&1 || { tail -5 "$tmp/pip.log" >&2; say "pip download ffcv failed"; exit 1; }
    local sdist sdist_sha
    sdist=$(ls "$tmp"/sdist/ffcv-"$FFCV_VERSION".tar.gz)
    sdist_sha=$(sha256sum "$sdist" | cut -d' ' -f1)
    tar -xzf "$sdist" -C "$stage/src"
    rm -rf "$stage/src/ffcv-$FFCV_VERSION"/{docs,assets,examples,test_data,tests,docker}
    "$PY" -m pip download --no-deps --only-binary=:all: --dest "$stage/wheels" "wheel==$WHEEL_VERSION" \
        > "$tmp/pip.log" 2>&1 || { tail -5 "$tmp/pip.log" >&2; say "pip download wheel failed"; exit 1; }

    # MANIFEST: what install checks before unpacking, and what is inside.
    {
        echo "format 1"
        echo "ffcv $FFCV_VERSION sha256 $sdist_sha"
        echo "glibc $glibc"
        echo "glibcxx $glibcxx"
        echo "cxxabi $cxxabi"
        echo "assumed ${ASSUMED[*]}"
        for deb in "$tmp"/debs/*.deb; do
            echo "deb $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
        done
        echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME" | tr ' ' _)"
        echo "unpacked_bytes $(du -sb "$stage" | cut -f1)"
    } > "$tmp/MANIFEST"
    cp "$tmp/MANIFEST" "$stage/MANIFEST"
    [ -z "$(find "$stage" -type l)" ] || { say "the carry must hold no symlinks: $(find "$stage" -type l | head -3)"; exit 1; }

    new="$CARRY.new"
    rm -rf "$new"
    mkdir -p "$new"
    tar -C "$stage" -cf - . | xz -6 -T0 > "$new/carry.tar.xz"
    cp "$tmp/MANIFEST" "$new/MANIFEST"
    rm -rf "$CARRY"
    mv "$new" "$CARRY"

    say "packed in $(since "$t0") s: $CARRY/ $(du -sb "$CARRY" | cut -f1) bytes (one carry entry: [\"$CARRY\"]),"
    say "  unpacked $(du -sb "$stage" | cut -f1) bytes: lib $(du -sb "$stage/lib" | cut -f1), include $(du -sb "$stage/include" | cut -f1), src $(du -sb "$stage/src" | cut -f1), wheels $(du -sb "$stage/wheels" | cut -f1)"
    say "  needs glibc >= $glibc, GLIBCXX_$glibcxx, CXXABI_$cxxabi; assumes ${ASSUMED[*]}"
    for f in "$stage"/lib/*; do printf '    %-28s %9d\n' "$(basename "$f")" "$(stat -c %s "$f")" >&2; done
}

# ---------------------------------------------------------------------------------------------- install

install() {
    local t_all step t dest site logs
    t_all=$(now)
    dest="${FFCV_CARRY_ROOT:-/tmp/ffcv_carry}"
    site="${FFCV_SITE:-/tmp/ffcv_site}"
    logs="${TMPDIR:-/tmp}/ffcv_carry_logs"
    mkdir -p "$logs"
    fail() { echo "ffcv_carry: install failed at $step: $*" >&2; exit 1; }
    show_log() { echo "---- $1 (last 25 lines)" >&2; tail -25 "$1" >&2; echo "----" >&2; }

    step=check t=$(now)
    [ -f "$CARRY/MANIFEST" ] && [ -f "$CARRY/carry.tar.xz" ] \
        || fail "no $CARRY/MANIFEST + carry.tar.xz in $ROOT (run 'pack' here and carry [\"$CARRY\"])"
    command -v "$PY" > /dev/null || fail "no $PY on PATH (set PYTHON)"
    local checked
    checked=$(MANIFEST="$CARRY/MANIFEST" "$PY" - 2>&1 <<'EOF'
import ctypes, os, shutil, subprocess, sys, sysconfig
man = dict(line.split(" ", 1) for line in open(os.environ["MANIFEST"]).read().splitlines() if " " in line)
def ver(s): return tuple(int(x) for x in s.split("."))
def die(msg): print(msg); sys.exit(1)
glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[-1]
if ver(glibc) < ver(man["glibc"]):
    die(f"glibc {glibc} here, the carried Debian bookworm libraries need >= {man['glibc']}")
for name in man["assumed"].split():
    if name.startswith("ld-linux"):
        continue
    try:
        ctypes.CDLL(name)
    except OSError as exc:
        die(f"{name}, which the carried libraries assume, cannot be loaded: {exc}")
stdcxx = next((line.split()[-1] for line in open("/proc/self/maps") if "/libstdc++.so" in line), None)
data = open(stdcxx, "rb").read()
for tag in ("GLIBCXX_" + man["glibcxx"], "CXXABI_" + man["cxxabi"]):
    if tag.encode() + b"\0" not in data:
        die(f"{stdcxx} lacks {tag}, which the carried libraries need (libstdc++ older than gcc 12)")
cc = (sysconfig.get_config_var("CC") or "gcc").split()[0]
cxx = (sysconfig.get_config_var("CXX") or "g++").split()[0]
cc_override = 0
if not (shutil.which(cc) and shutil.which(cxx)):
    # a Python built elsewhere (e.g. with clang at a build path): distutils takes CC / CXX / LDSHARED instead
    if not (shutil.which("gcc") and shutil.which("g++")):
        die(f"no C/C++ compiler: neither this Python's ({cc}, {cxx}) nor gcc and g++ are on PATH")
    cc, cc_override = "gcc", 1
cc1plus = subprocess.run([cc, "-print-prog-name=cc1plus"], capture_output=True, text=True).stdout.strip()
if "/" not in cc1plus:
    die(f"{cc} cannot compile C++ (no cc1plus: g++ is not installed)")
pyh = int(os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
try:
    import setuptools
except ImportError:
    die("this Python has no setuptools")
try:
    import setuptools.command.bdist_wheel  # noqa: F401  setuptools >= 70.1
    wheel = "setuptools"
except ImportError:
    try:
        import wheel.bdist_wheel  # noqa: F401
        wheel = "wheel"
    except ImportError:
        wheel = "carried"
print(f"glibc={glibc} stdcxx={stdcxx} cc={shutil.which(cc)} cc_override={cc_override} python_h={pyh} wheel={wheel} setuptools={setuptools.__version__}")
EOF
    ) || fail "$(echo "$checked" | tail -1)"
    local python_h wheel_from cc_override
    cc_override=$(echo "$checked" | tail -1 | sed -n 's/.*cc_override=\([01]\).*/\1/p')
    python_h=$(echo "$checked" | tail -1 | sed -n 's/.*python_h=\([01]\).*/\1/p')
    wheel_from=$(echo "$checked" | tail -1 | sed -n 's/.*wheel=\([a-z]*\).*/\1/p')
    say "check $(since "$t") s: $(echo "$checked" | tail -1) (needs glibc >= $(awk '$1 == "glibc" { print $2 }' "$CARRY/MANIFEST"))"

    step=unpack t=$(now)
    if ! cmp -s "$CARRY/MANIFEST" "$dest/MANIFEST"; then
        rm -rf "$dest"
        mkdir -p "$dest"
        # Python's tarfile (lzma is built in) rather than tar -J: the image may lack xz.
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))" \
            "$CARRY/carry.tar.xz" "$dest" 2> "$logs/unpack.log" || { show_log "$logs/unpack.log"; fail "cannot unpack $CARRY/carry.tar.xz into $dest"; }
    fi
    local link
    for link in "${DEV_LINKS[@]}"; do ln -sfn "${link#*:}" "$dest/lib/${link%%:*}"; done
    say "unpack $(since "$t") s: $(du -sb "$CARRY" | cut -f1) bytes carried -> $(du -sb "$dest" | cut -f1) bytes in $dest"

    # Both builds see the carried pkg-config first, and link with a DT_RPATH to the carried libraries
    # (--disable-new-dtags: a DT_RUNPATH would not be searched for the libraries' own dependencies).
    local build_path="$dest/bin:$PATH" ldflags="-Wl,-rpath,$dest/lib -Wl,--disable-new-dtags"
    local build_pythonpath="" ffcv_cppflags="${CPPFLAGS:-}"
    if [ "$python_h" = 0 ]; then
        ffcv_cppflags="$ffcv_cppflags -I$dest/stub_include"
        say "note: this Python has no Python.h (python3-dev): FFCV is built with the carried stable-ABI stand-in"
    fi
    [ "$wheel_from" = carried ] && build_pythonpath=$(ls "$dest"/wheels/wheel-*.whl)
    if [ "$cc_override" = 1 ]; then
        export CC=gcc CXX=g++ LDSHARED="gcc -shared"
        say "note: this Python's own compiler is not here: building with gcc / g++"
    fi

    step=build t=$(now)
    rm -rf "$site" "$dest/src/build_ffcv"
    cp -r "$dest/src/ffcv-$FFCV_VERSION" "$dest/src/build_ffcv" # builds in tree: keep the unpacked copy clean
    (
        s=$(now)
        PATH="$build_path" LDFLAGS="$ldflags" CPPFLAGS="$ffcv_cppflags" PYTHONPATH="$build_pythonpath" \
            PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$PY" -m pip install -v --no-index --no-build-isolation --no-deps --target "$site" \
            "$dest/src/build_ffcv" > "$logs/ffcv.log" 2>&1
        since "$s" > "$logs/ffcv.s"
    ) &
    local ffcv_pid=$!
    (
        s=$(now)
        PATH="$build_path" LDFLAGS="$ldflags" PYTHONPATH="" \
            "$PY" setup.py build_ext --inplace --build-temp "$dest/build_cropdecode" \
            --build-lib "$dest/build_cropdecode/lib" > "$logs/cropdecode.log" 2>&1
        since "$s" > "$logs/cropdecode.s"
    ) &
    local crop_pid=$!
    local ffcv_ok=1 crop_ok=1
    wait "$ffcv_pid" || ffcv_ok=0
    wait "$crop_pid" || crop_ok=0
    first_error() { grep -m1 -E 'error:|Error:|ERROR:|fatal' "$1" | cut -c1-300 || tail -1 "$1"; }
    [ $ffcv_ok = 1 ] || { show_log "$logs/ffcv.log"; step=build-ffcv; fail "$(first_error "$logs/ffcv.log") (log: $logs/ffcv.log)"; }
    [ $crop_ok = 1 ] || { show_log "$logs/cropdecode.log"; step=build-cropdecode; fail "$(first_error "$logs/cropdecode.log") (log: $logs/cropdecode.log)"; }
    local ext
    ext=$(ls pipelines/_cropdecode*.so)
    say "build $(since "$t") s (both at once): ffcv $(cat "$logs/ffcv.s") s -> $site, cropdecode $(cat "$logs/cropdecode.s") s -> $ext"

    step=verify t=$(now)
    local pythonpath="$site:$ROOT"
    local verified
    verified=$(env -u LD_LIBRARY_PATH PYTHONPATH="$pythonpath" CARRY_LIB="$dest/lib" "$PY" - 2>&1 <<'EOF'
import importlib.metadata, io, os, sys
import numpy as np
import ffcv, ffcv.loader, ffcv.fields.decoders, ffcv.transforms  # noqa: F401  what the product imports
from ffcv.libffcv import imdecode
from pipelines.ffcv_cropdecode import compiled_kernels, decode_window
compiled_kernels()
h, w = 48, 64
yy, xx = np.mgrid[0:h, 0:w]
img = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
try:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    jpeg = np.frombuffer(buf.getvalue(), np.uint8)
except ImportError:
    import cv2
    jpeg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].ravel()
ours = decode_window(jpeg, (h, w), (0, 0, h, w), (h, w))
theirs = np.zeros((h, w, 3), np.uint8)
status = imdecode(jpeg, theirs, h, w, h, w, 0, 0, 1, 1, False, False)
if status != 0:
    sys.exit(f"FFCV's imdecode failed with status {status}")
err_ours = float(np.abs(ours.astype(int) - img).mean())
err_theirs = float(np.abs(theirs.astype(int) - img).mean())
diff = int(np.abs(ours.astype(int) - theirs).max())
if max(err_ours, err_theirs) > 3:
    sys.exit(f"a decode is wrong: mean error vs the source image {err_ours:.2f} (crop decoder), {err_theirs:.2f} (FFCV)")
carry = os.environ["CARRY_LIB"]
wanted = {"libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0", "libjpeg.so.62"}
loaded = {}
for line in open("/proc/self/maps"):
    path = line.split()[-1]
    if os.path.basename(path) in wanted:
        loaded[os.path.basename(path)] = path
stray = {k: v for k, v in loaded.items() if not v.startswith(carry)}
if stray or set(loaded) != wanted:
    sys.exit(f"libraries not from the carry: {stray or sorted(wanted - set(loaded))}")
print(f"ffcv {importlib.metadata.version('ffcv')} from {os.path.dirname(ffcv.__file__)}, one JPEG decoded by both "
      f"(mean error {err_ours:.2f} / {err_theirs:.2f}, max diff {diff}), {len(loaded)} libraries from {carry}, no LD_LIBRARY_PATH")
EOF
    ) || { echo "$verified" | tail -15 >&2; fail "$(echo "$verified" | tail -1)"; }
    say "verify $(since "$t") s: $(echo "$verified" | tail -1)"
    say "installed in $(since "$t_all") s; eval the line on stdout"
    echo "export PYTHONPATH=$pythonpath\${PYTHONPATH:+:\$PYTHONPATH}"
}

# ---------------------------------------------------------------------------------------------- rehearse

# Entries of the project venv's site-packages that the GPU image does not have (besides pip/setuptools/wheel,
# which the rehearsal venv brings itself): FFCV and its extra dependencies, DALI and its libraries, test tools.
NOT_ON_IMAGE='^(ffcv|assertpy|fastargs|terminaltables|pytorch_pfn_extras|imgcat|pkgconfig|webdataset|wids|braceexpand|rec2idx|wds2idx|nvidia_dali|nvidia_nvimgcodec|nvidia_nvjpeg2k|nvidia_nvtiff|nvidia_libnvcomp|scipy|pip|setuptools|_distutils_hack|distutils-precedence|pkg_resources|wheel|__editable__|supmae|pytest|_pytest|pluggy|iniconfig|py\.py|ruff)'
NOT_ON_IMAGE_NVIDIA='^(dali|nvimgcodec|nvjpeg2k|nvtiff|libnvcomp)$'

rehearse() {
    [ "$(id -u)" = 0 ] || { say "rehearse hides system files with mount namespaces: run it as root"; exit 2; }
    command -v unshare > /dev/null || { say "rehearse needs unshare (util-linux)"; exit 2; }
    local venv="${VENV:-.venv}" R="${REHEARSE_DIR:-/tmp/ffcv_carry_rehearse}" t0
    [ -x "$venv/bin/python" ] || { say "rehearse borrows torch & co from the project venv $venv: run make setup"; exit 2; }
    [ -f "$CARRY/MANIFEST" ] || pack
    t0=$(now)
    rm -rf "$R"
    mkdir -p "$R"/{tree,home,tmp,hide/empty,image_site}
    R=$(cd "$R" && pwd)

    # 1. The tree as a device call carries it: tracked and untracked-unignored files, plus the carry folder
    #    (so no pipelines/_cropdecode*.so built here comes along).
    git ls-files -z -co --exclude-standard | tar --null -T - -cf - 2> /dev/null | tar -xf - -C "$R/tree"
    cp -r "$CARRY" "$R/tree/.ffcv_carry"
    ! ls "$R"/tree/pipelines/*.so > /dev/null 2>&1 || { say "a built crop decoder travelled with the tree"; exit 1; }

    # 2. An image-like Python: a fresh venv (no system site-packages) with a recent setuptools and no wheel
    #    package, seeing the project venv's packages except those the image lacks (FFCV above all).
    local src_site
    src_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    local e name
    for e in "$src_site"/*; do
        name=$(basename "$e")
        [[ "${name,,}" =~ $NOT_ON_IMAGE ]] && continue
        [ "$name" = nvidia ] && continue
        ln -s "$e" "$R/image_site/$name"
    done
    if [ -d "$src_site/nvidia" ]; then
        mkdir -p "$R/image_site/nvidia"
        for e in "$src_site"/nvidia/*; do
            [[ "$(basename "$e")" =~ $NOT_ON_IMAGE_NVIDIA ]] || ln -s "$e" "$R/image_site/nvidia/$(basename "$e")"
        done
    fi
    "$PY" -m venv "$R/venv"
    local vsite
    vsite=$("$R/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$R/image_site')" > "$vsite/zz_image_site.pth"
    if [ "${REHEARSE_OLD_SETUPTOOLS:-0}" = 1 ]; then
        say "keeping the venv's own setuptools (REHEARSE_OLD_SETUPTOOLS=1): FFCV's wheel is built with the carried 'wheel'"
    else
        "$R/venv/bin/python" -m pip install -q --upgrade setuptools > "$R/tmp/setuptools.log" 2>&1 \
            || { tail -3 "$R/tmp/setuptools.log" >&2; say "cannot upgrade setuptools in the rehearsal venv"; exit 1; }
    fi
    "$R/venv/bin/python" -m pip uninstall -q -y wheel > /dev/null 2>&1 || true
    "$R/venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("ffcv") is not None)' \
        || { say "ffcv is importable in the rehearsal venv before install"; exit 1; }
    say "rehearse: tree + venv ready in $(since "$t0") s ($R)"

    # 3. Inside a private mount namespace: hide the system's OpenCV / libjpeg-turbo headers, libraries and
    #    pkg-config, check that they are hidden, then run install exactly as the GPU machine would.
    printf '#error "hidden by ffcv_carry rehearse: this header must come from the carry"\n' > "$R/hide/error.h"
    printf 'not a library: hidden by ffcv_carry rehearse\n' > "$R/hide/garbage"
    printf '#!/bin/sh\necho "pkg-config hidden by ffcv_carry rehearse" >&2\nexit 127\n' > "$R/hide/nopkgconfig"
    chmod +x "$R/hide/nopkgconfig"
    local libnames
    libnames=$(tar -tJf "$CARRY/carry.tar.xz" | sed -n 's|^\./lib/||p' | grep . | tr '\n' ' ')
    local pyinclude=""
    if [ "${REHEARSE_NO_PYTHON_H:-0}" = 1 ]; then
        pyinclude=$("$R/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
        say "hiding this Python's headers too (REHEARSE_NO_PYTHON_H=1): $pyinclude"
    fi
    cat > "$R/inside.sh" <<EOF
set -euo pipefail
R=$R
libnames="$libnames"
pyinclude="$pyinclude"
EOF
    cat >> "$R/inside.sh" <<'EOF'
n_dirs=0 n_headers=0 n_libs=0 n_tools=0
hide_dir() { [ -d "$1" ] || return 0; mount --bind "$R/hide/empty" "$1"; n_dirs=$((n_dirs + 1)); }
hidden=" "
hide_file() { # $1 = what to bind over the real file behind $2
    local real
    real=$(readlink -f "$2") || return 0
    [ -f "$real" ] || return 0
    [[ "$hidden" == *" $real "* ]] && return 0
    mount --bind "$1" "$real"
    hidden="$hidden$real "
    return 0
}
for d in /usr/include/opencv4 /usr/lib/x86_64-linux-gnu/pkgconfig /usr/share/pkgconfig /usr/lib/pkgconfig \
         /usr/lib/x86_64-linux-gnu/cmake/opencv4 $pyinclude; do hide_dir "$d"; done
for h in /usr/include/{turbojpeg.h,jpeglib.h,jerror.h,jmorecfg.h,jpegint.h} /usr/include/x86_64-linux-gnu/jconfig.h; do
    [ -e "$h" ] && { hide_file "$R/hide/error.h" "$h"; n_headers=$((n_headers + 1)); }
done
for tool in pkg-config pkgconf x86_64-linux-gnu-pkg-config; do
    p=$(command -v "$tool" || true)
    [ -n "$p" ] && { hide_file "$R/hide/nopkgconfig" "$p"; n_tools=$((n_tools + 1)); }
done
shopt -s nullglob
for dir in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/blas /usr/lib/x86_64-linux-gnu/lapack; do
    for name in $libnames; do
        for f in "$dir/${name%%.so*}".so*; do hide_file "$R/hide/garbage" "$f"; done
        for f in "$dir/${name%%.so*}".a; do hide_file "$R/hide/garbage" "$f"; done
    done
    for f in "$dir"/libopencv_*; do hide_file "$R/hide/garbage" "$f"; done
done
n_libs=$(echo $hidden | wc -w)
echo "ffcv_carry: rehearse: hidden $n_dirs folders (opencv4 headers, pkgconfig), $n_headers jpeg headers, $n_tools pkg-config binaries, $n_libs library files in all" >&2
# Prove it: no system header, no pkg-config, no system OpenCV / libjpeg-turbo library.
! echo '#include <jpeglib.h>' | gcc -x c -E - > /dev/null 2>&1 || { echo "jpeglib.h still visible" >&2; exit 1; }
! echo '#include <opencv2/core.hpp>' | g++ -x c++ -E - > /dev/null 2>&1 || { echo "opencv2 still visible" >&2; exit 1; }
! pkg-config --cflags opencv4 > /dev/null 2>&1 || { echo "pkg-config still answers" >&2; exit 1; }
! python3 -c 'import ctypes; ctypes.CDLL("libopencv_core.so.406")' > /dev/null 2>&1 || { echo "libopencv_core still loadable" >&2; exit 1; }
! python3 -c 'import ctypes; ctypes.CDLL("libturbojpeg.so.0")' > /dev/null 2>&1 || { echo "libturbojpeg still loadable" >&2; exit 1; }
if [ -n "$pyinclude" ]; then
    ! echo '#include <Python.h>' | gcc -x c -E -I"$pyinclude" - > /dev/null 2>&1 || { echo "Python.h still visible" >&2; exit 1; }
fi
echo "ffcv_carry: rehearse: checked hidden: jpeglib.h, opencv2/, pkg-config, libopencv_core, libturbojpeg${pyinclude:+, Python.h}" >&2
cd "$R/tree"
env -i PATH="$R/venv/bin:/usr/local/bin:/usr/bin:/bin" HOME="$R/home" TMPDIR="$R/tmp" LANG=C.UTF-8 \
    FFCV_SITE="$R/ffcv_site" FFCV_CARRY_ROOT="$R/carry_root" FFCV_CARRY=.ffcv_carry \
    bash benchmarks/ffcv_carry.sh install > "$R/env.sh"
# The exported line alone is enough, from anywhere.
cd /
env -i PATH="$R/venv/bin:/usr/bin:/bin" HOME="$R/home" bash -c ". '$R/env.sh' && python3 -c '
import ffcv.loader
from pipelines.ffcv_cropdecode import crop_decode_functions
crop_decode_functions()
print(\"ffcv_carry: rehearse: a fresh process with only the exported line imports ffcv.loader and loads the crop decoder\")'"
EOF
    local t1
    t1=$(now)
    unshare -m --propagation private bash "$R/inside.sh" 2>&1 | tee "$R/rehearse.log" >&2
    [ "${PIPESTATUS[0]}" = 0 ] || { say "rehearse FAILED (log: $R/rehearse.log)"; exit 1; }
    say "rehearse ok: $(du -sb "$CARRY" | cut -f1) bytes carried ($CARRY), install $(sed -n 's/.*installed in \([0-9.]*\) s.*/\1/p' "$R/rehearse.log") s, namespace $(since "$t1") s; export line:"
    cat "$R/env.sh" >&2
}

case "${1:-}" in
    pack) pack ;;
    install) install ;;
    rehearse) rehearse ;;
    shim) write_shim "${2:?shim DIR}" ;;
    python-h) write_python_h "${2:?python-h DIR}" ;;
    *)
        sed -n '2,8p' "$0" >&2
        exit 2
        ;;
esac
