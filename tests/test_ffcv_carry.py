"""benchmarks/ffcv_carry.sh: the pieces that need no registry, no root and no GPU (the pkg-config stand-in,
the Python.h stand-in, install's refusals), and, only when asked (SUPMAE_FFCV_CARRY_REHEARSE=1, as root with
apt and unshare), the whole pack + rehearse."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "benchmarks", "ffcv_carry.sh")


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True, check=False).returncode == 0


def test_pkg_config_stand_in(tmp_path):
    assert _run("shim", str(tmp_path)).returncode == 0
    shim = str(tmp_path / "bin" / "pkg-config")

    def ask(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([shim, *args], capture_output=True, text=True, check=False)

    top = str(tmp_path)
    # FFCV's setup.py: `pkg-config --cflags --libs X`, every token -I, -L or -l (anything else breaks it).
    out = ask("--cflags", "--libs", "opencv4").stdout.split()
    assert out == [f"-I{top}/include/opencv4", f"-I{top}/include", f"-L{top}/lib", "-lopencv_imgproc", "-lopencv_core"]
    out = ask("--cflags", "--libs", "libturbojpeg").stdout.split()
    assert out == [f"-I{top}/include/opencv4", f"-I{top}/include", f"-L{top}/lib", "-lturbojpeg"]
    # our setup.py: --cflags (jpeglib.h comes from the same -I) and --libs-only-L.
    assert ask("--libs-only-L", "opencv4").stdout.split() == [f"-L{top}/lib"]
    assert ask("--modversion", "opencv4").stdout.strip() == "4.6.0"
    assert ask("--exists", "libjpeg").returncode == 0
    # FFCV's setup.py recognises a missing package by "not found" in the merged output.
    missing = ask("--cflags", "--libs", "gtk+-3.0")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_python_h_stand_in_builds_an_importable_module(tmp_path):
    """The constructs libffcv.cpp takes from Python.h, compiled against the stand-in, import in this Python."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    assert _run("python-h", str(tmp_path)).returncode == 0
    src = tmp_path / "m.cpp"
    src.write_text(
        "#include <cstdint>\n#include <Python.h>\n"
        'extern "C" {\n'
        "    int answer() { return 42; }\n"
        "    static PyMethodDef methods[] = {{NULL, NULL, 0, NULL}};\n"
        '    static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "stubmod", "dummy", -1, methods};\n'
        "    PyMODINIT_FUNC PyInit_stubmod(void) { return PyModule_Create(&mod); }\n"
        "}\n"
    )
    so = tmp_path / "stubmod.so"
    build = subprocess.run(
        [cxx, "-shared", "-fPIC", "-O1", f"-I{tmp_path / 'stub_include'}", str(src), "-o", str(so)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    spec = importlib.util.spec_from_file_location("stubmod", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__ == "dummy"


def test_install_without_a_carry_fails_in_one_line(tmp_path):
    result = _run("install", env={"FFCV_CARRY": str(tmp_path / "absent"), "TMPDIR": str(tmp_path)})
    assert result.returncode == 1
    assert result.stdout == ""  # nothing for the caller to eval
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ffcv_carry: install failed at check: no ") and "pack" in last


def test_install_refuses_an_old_glibc_before_building(tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / "carry.tar.xz").write_bytes(b"")
    (carry / "MANIFEST").write_text("format 1\nglibc 99.0\nglibcxx 3.4.0\ncxxabi 1.3\nassumed libc.so.6 libm.so.6\n")
    result = _run(
        "install", env={"FFCV_CARRY": str(carry), "TMPDIR": str(tmp_path), "FFCV_CARRY_ROOT": str(tmp_path / "root")}
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ffcv_carry: install failed at check: glibc ") and "need >= 99.0" in last
    assert not (tmp_path / "root").exists()  # refused before unpacking


@pytest.mark.slow
def test_pack_and_rehearse(tmp_path):
    """The real thing: pack from apt + pip, install in a clean venv with the system's OpenCV / libjpeg-turbo
    headers, libraries and pkg-config hidden. Minutes and registries: only when asked."""
    if os.environ.get("SUPMAE_FFCV_CARRY_REHEARSE") != "1":
        pytest.skip("set SUPMAE_FFCV_CARRY_REHEARSE=1 to pack and rehearse (apt, pip, root, unshare; minutes)")
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("apt-get"):
        pytest.skip("needs root, unshare and apt-get")
    if not os.path.isfile(os.path.join(ROOT, ".venv", "bin", "python")):
        pytest.skip("needs the project venv (make setup)")
    carry = str(tmp_path / "carry")
    env = {"FFCV_CARRY": carry, "REHEARSE_DIR": str(tmp_path / "rehearse")}
    packed = _run("pack", env=env, timeout=900)
    assert packed.returncode == 0, packed.stderr[-3000:]
    total = sum(os.path.getsize(os.path.join(carry, f)) for f in os.listdir(carry))
    assert total < 30e6  # one device call carries 64 MiB in all
    rehearsed = _run("rehearse", env=env, timeout=900)
    assert rehearsed.returncode == 0, rehearsed.stderr[-3000:]
    assert "rehearse ok" in rehearsed.stderr
