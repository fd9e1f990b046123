"""Compile the C++ training kernels (ops.cc, depthwise.cc) against the installed TensorFlow.

    python -m van_trainer.kernels.build            # build if missing, print the library's path
    python -m van_trainer.kernels.build --force    # rebuild

The library's file name carries a key of its sources, flags and the TensorFlow version, so a
changed source or TensorFlow never loads a stale build. depthwise.cc is compiled once
per ISA (AVX-512, AVX2+FMA, AVX); ops.cc picks one when the library loads, so one build runs on
any x86-64 CPU TensorFlow runs on. `make venv` and the Dockerfile build it ahead of time; a
missing library is built on first use (about 10 s with g++), into the first writable of the
package's own `_build/` and `~/.cache/van-tfx/kernels/` ($VAN_TFX_KERNELS_DIR replaces both).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ("depthwise.h", "depthwise.cc", "ops.cc")
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "avx": ["-mavx"],  # TensorFlow's own pip wheels require AVX
}
COMMON_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-Wno-psabi", "-fvisibility=hidden"]
CACHE_DIR_ENV = "VAN_TFX_KERNELS_DIR"


def compiler() -> str:
    """The C++ compiler: $CXX, else g++."""
    return os.environ.get("CXX", "g++")


def _tf_flags() -> tuple[list[str], list[str]]:
    import tensorflow as tf

    return list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"C++ compiler {cxx!r} is not usable: {exc}") from exc
    return out.stdout.splitlines()[0] if out.stdout else cxx


class BuildError(RuntimeError):
    """The kernels library could not be built (no compiler, a compile error)."""


def library_name() -> str:
    """File name of the library for these sources, flags and TensorFlow (not the compiler)."""
    # Not the compiler: an image built with g++ then drops it, and the library must still be found.
    import tensorflow as tf

    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    for part in (tf.__version__, *ISA_FLAGS.items(), *COMMON_FLAGS):
        digest.update(str(part).encode())
    return f"van_kernels-{digest.hexdigest()[:16]}.so"


def search_dirs() -> list[pathlib.Path]:
    """Where a built library is looked for, and built into (the first writable one)."""
    # $VAN_TFX_KERNELS_DIR alone if set, else the package's _build/ and the user's cache.
    if os.environ.get(CACHE_DIR_ENV):
        return [pathlib.Path(os.environ[CACHE_DIR_ENV])]
    return [HERE / "_build", pathlib.Path.home() / ".cache" / "van-tfx" / "kernels"]


def find_library() -> pathlib.Path | None:
    """The already-built library for this setup, if any."""
    name = library_name()
    for directory in search_dirs():
        if (directory / name).is_file():
            return directory / name
    return None


def _writable_dir() -> pathlib.Path:
    for directory in search_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise BuildError(f"no writable directory for the kernels library among {search_dirs()}")


def _run(cmd: list[str], cwd: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def build_library(out_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Compile the library (the three ISA objects in parallel) and return its path."""
    cxx = compiler()
    _compiler_version(cxx)  # a clear error when there is no compiler at all
    compile_flags, link_flags = _tf_flags()
    out_dir = out_dir or _writable_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / library_name()
    with tempfile.TemporaryDirectory(prefix="van_kernels_") as tmp:
        jobs = {
            f"depthwise.cc ({isa})": _run(
                [
                    cxx,
                    *COMMON_FLAGS,
                    f"-DVAN_ISA={isa}",
                    *flags,
                    "-c",
                    str(HERE / "depthwise.cc"),
                    "-o",
                    f"{isa}.o",
                ],
                tmp,
            )
            for isa, flags in ISA_FLAGS.items()
        }
        jobs["ops.cc"] = _run(
            [cxx, *COMMON_FLAGS, *compile_flags, "-c", str(HERE / "ops.cc"), "-o", "ops.o"], tmp
        )
        failures = []
        for what, job in jobs.items():
            output, _ = job.communicate()
            if job.returncode:
                failures.append(f"{what}:\n{output}")
        if failures:
            raise BuildError("compiling the kernels failed: " + "\n".join(failures))
        objects = ["ops.o", *(f"{isa}.o" for isa in ISA_FLAGS)]
        link = subprocess.run(
            [cxx, "-shared", "-o", "lib.so", *objects, *link_flags],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        if link.returncode:
            raise BuildError(f"linking the kernels failed:\n{link.stdout}{link.stderr}")
        # Rename into place: a process loading the library never sees half a file.
        staged = out_dir / f".{target.name}.{os.getpid()}"
        shutil.copyfile(os.path.join(tmp, "lib.so"), staged)
        os.replace(staged, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Build the library unless it is already built; print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if built")
    parser.add_argument("--out", type=pathlib.Path, help="directory to build into")
    args = parser.parse_args(argv)
    if args.force:
        found = None
    elif args.out:
        found = args.out / library_name() if (args.out / library_name()).is_file() else None
    else:
        found = find_library()
    try:
        path = found or build_library(args.out)
    except BuildError as exc:
        print(f"van-tfx kernels: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
