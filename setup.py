"""Build logic only: the metadata lives in pyproject.toml.

Compiles _fastcount/_counters_c.pyx and _fastcount/_http_c.pyx. A compiler
error fails the install: only `import _fastcount` falls back to the pure-Python
twins, never the build. Set FASTCOUNT_NO_EXTENSIONS to a non-empty value to
skip the extensions.
"""

import os
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("FASTCOUNT_NO_EXTENSIONS"))
if sys.implementation.name != "cpython":
    NO_EXTENSIONS = True

if NO_EXTENSIONS:
    print("*********************", file=sys.stderr)
    print("* Pure Python build *", file=sys.stderr)
    print("*********************", file=sys.stderr)
    ext_modules = []
else:
    from Cython.Build import cythonize

    extra_compile_args = [] if sys.platform == "win32" else ["-O2"]
    ext_modules = cythonize(
        [
            Extension(
                f"_fastcount.{name}",
                [f"_fastcount/{name}.pyx"],
                extra_compile_args=extra_compile_args,
            )
            for name in ("_counters_c", "_http_c")
        ],
        compiler_directives={
            "language_level": "3",
            # Indexing is on C pointers, range-checked by the engine itself
            # (field, slot masks): no Python-style checks or negative indexes.
            "boundscheck": False,
            "wraparound": False,
            # Signatures visible to help() and inspect, as the .pyi declares them.
            "embedsignature": True,
        },
    )

setup(ext_modules=ext_modules)
