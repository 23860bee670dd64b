"""Build glue: the cffi extension and the freestanding husk program.

All metadata lives in pyproject.toml; this file only adds the two native build steps."""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext

HUSK_SOURCE = os.path.join("native", "husk.c")
HUSK_FLAGS = ["-Os", "-static", "-nostdlib", "-no-pie", "-fno-pie", "-fno-stack-protector",
              "-fno-asynchronous-unwind-tables", "-ffreestanding", "-Wall", "-Wl,--build-id=none"]


class BuildWithHusk(build_ext):
    """build_ext that also links native/husk.c into prerestore/prerestore-husk."""

    def run(self):
        super().run()
        package_dir = "prerestore" if self.inplace else os.path.join(self.build_lib, "prerestore")
        os.makedirs(package_dir, exist_ok=True)
        target = os.path.join(package_dir, "prerestore-husk")
        subprocess.check_call(["cc", *HUSK_FLAGS, "-o", target, HUSK_SOURCE])


setup(cffi_modules=["native/build.py:ffibuilder"], cmdclass={"build_ext": BuildWithHusk})
