"""Builds the Cython extensions; everything else is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wno-unused-function", "-Wno-unreachable-code"]

extensions = [
    Extension("zramfs._alloc", ["zramfs/_alloc.pyx"], extra_compile_args=COMPILE_ARGS),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
