"""cffi build script: compiles native/prerestore.c into prerestore._native (API mode)."""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "prerestore.h").read_text())
ffibuilder.cdef((HERE / "constants.cdef").read_text())
ffibuilder.set_source(
    "prerestore._native",
    '#include "prerestore.c"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
