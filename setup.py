"""Build glue for the one compiled part of the project: pipelines/_cropdecode.cpp, the ffcv
pipeline's crop-window JPEG decoder (libjpeg-turbo + OpenCV, the system libraries FFCV itself is
built against; scripts/setup.sh installs them). Everything else is declared in pyproject.toml."""

import shlex
import subprocess

from setuptools import Extension, setup


def _opencv_flags() -> tuple[list[str], list[str], list[str]]:
    """(include dirs, library dirs, libraries) of OpenCV's core and imgproc, from pkg-config."""
    for name in ("opencv4", "opencv"):
        try:
            cflags = subprocess.run(["pkg-config", "--cflags", name], capture_output=True, text=True, check=True)
            libs = subprocess.run(["pkg-config", "--libs-only-L", name], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        includes = [f[2:] for f in shlex.split(cflags.stdout) if f.startswith("-I")]
        libdirs = [f[2:] for f in shlex.split(libs.stdout) if f.startswith("-L")]
        return includes, libdirs, ["opencv_imgproc", "opencv_core"]
    raise SystemExit(
        "building pipelines/_cropdecode needs OpenCV's development files found by pkg-config "
        "(Debian/Ubuntu: libopencv-dev pkg-config; scripts/setup.sh installs them)"
    )


includes, libdirs, cv_libs = _opencv_flags()
setup(
    ext_modules=[
        Extension(
            "pipelines._cropdecode",
            sources=["pipelines/_cropdecode.cpp"],
            include_dirs=includes,
            library_dirs=libdirs,
            libraries=["jpeg", *cv_libs],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
        )
    ]
)
