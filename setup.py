"""Builds mmoe_fast._C (pybind11, OpenMP where the compiler has it); the install succeeds without it."""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # no pybind11 in this build environment: install the pure-Python package
    Pybind11Extension = None

OPENMP = ["-fopenmp"]


class OptionalBuildExt(build_ext):
    """Try with OpenMP, then without; if the compiler fails, warn and install without ``_C``."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            return
        except Exception as exc:  # noqa: BLE001 - any compiler failure is non-fatal here
            print(f"mmoe_fast: building {ext.name} with OpenMP failed ({exc}); retrying without", file=sys.stderr)
        ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
        ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"mmoe_fast: WARNING: {ext.name} not built ({exc}); the C++ backend is unavailable",
                  file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension(
            "mmoe_fast._C",
            ["csrc/mmoe_cpu.cpp", "csrc/kernels.cpp"],
            depends=["csrc/kernels.h", "csrc/kernels_body.h"],
            cxx_std=17,
            # fp-contract: a * b + c as one FMA (ISO C++ mode turns that off); no-math-errno: std::sqrt as one
            # instruction, vectorized (nothing reads errno); no -march: see kernels.cpp
            extra_compile_args=["-O3", "-ffp-contract=fast", "-fno-math-errno", *OPENMP],
            extra_link_args=OPENMP,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
