"""Builds the Cython extensions; everything else is in pyproject.toml."""
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wno-unused-function", "-Wno-unreachable-code"]


def extension(name: str, *libraries: str, macros: tuple = ()) -> Extension:
    """zramfs.<folder>.<module> from zramfs/<folder>/<module>.pyx (`name` is "folder/module"),
    with system libraries found through pkg-config. Headers are named from zramfs/, as
    "zram/zram.h"."""
    def pkg_config(option: str) -> list[str]:
        if not libraries:
            return []
        out = subprocess.run(["pkg-config", option, *libraries], check=True,
                             capture_output=True, text=True).stdout
        return out.split()
    return Extension(
        f"zramfs.{name.replace('/', '.')}", [f"zramfs/{name}.pyx"],
        extra_compile_args=COMPILE_ARGS + pkg_config("--cflags"),
        extra_link_args=pkg_config("--libs"),
        define_macros=list(macros),
        include_dirs=["zramfs"],
    )


extensions = [
    # The allocator (zpool/): the page source, the two backends over it, and the Python face.
    extension("zpool/_pages"),
    extension("zpool/_zsmalloc"),
    extension("zpool/_zbud"),
    extension("zpool/_alloc"),
    # The compressors (zcomp/): streams and every backend, each through its library.
    extension("zcomp/_zcomp", "lzo2", "liblz4", "libzstd", "zlib"),
    # A device's data path (zram/).
    extension("zram/_backing", "liburing"),
    extension("zram/_workers"),
    extension("zram/_zram"),
    # Dedup's content hash: XXH3 from libxxhash (see _dedup.pyx for why that hash).
    extension("zram/_dedup", "libxxhash"),
    extension("zram/_tiering"),
    # The memory keeper of a live restart (service/keeper.h).
    extension("service/_keeper"),
    # The FUSE engine (fuse/).
    extension("fuse/_fuse", "liburing"),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
