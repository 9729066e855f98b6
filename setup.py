"""Builds the Cython extensions; everything else is in pyproject.toml."""
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wno-unused-function", "-Wno-unreachable-code"]


def extension(name: str, *libraries: str, macros: tuple = ()) -> Extension:
    """zramfs.<name> from zramfs/<name>.pyx, with system libraries found through pkg-config."""
    def pkg_config(option: str) -> list[str]:
        if not libraries:
            return []
        out = subprocess.run(["pkg-config", option, *libraries], check=True,
                             capture_output=True, text=True).stdout
        return out.split()
    return Extension(
        f"zramfs.{name}", [f"zramfs/{name}.pyx"],
        extra_compile_args=COMPILE_ARGS + pkg_config("--cflags"),
        extra_link_args=pkg_config("--libs"),
        define_macros=list(macros),
        include_dirs=["zramfs"],
    )


extensions = [
    # The allocator: the page source, the two backends over it, and the Python face.
    extension("_pages"),
    extension("_zsmalloc"),
    extension("_zbud"),
    extension("_alloc"),
    extension("_zcomp", "lzo2", "liblz4", "libzstd", "zlib"),
    extension("_backing"),
    extension("_workers"),
    extension("_zram"),
    # Dedup's content hash: XXH3 from libxxhash (see _dedup.pyx for why that hash).
    extension("_dedup", "libxxhash"),
    extension("_tiering"),
    # The memory keeper of a live restart (keeper.h).
    extension("_keeper"),
    extension("_fuse", "liburing"),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
