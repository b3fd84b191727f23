"""Builds only the optional CUDA extension ``peft_kernels._C``; everything else is in pyproject.toml.

The extension is plain CUDA C++ + pybind11 (csrc/README.md explains why it never includes torch). It is built
when nvcc is found (``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH) and ``PEFT_KERNELS_SKIP_CUDA_BUILD`` is unset;
otherwise the install continues without it and prints one line saying why. torch is never imported here, so the
build works on a CPU-only machine and inside pip's build isolation.

Environment:
    PEFT_KERNELS_SKIP_CUDA_BUILD=1    skip the extension
    PEFT_KERNELS_CUDA_ARCHS="80;90"   cubin architectures (else TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX"; else
                                      "80;90"); PTX of the highest one is always embedded so newer GPUs can JIT it
    MAX_JOBS=N                        parallel compile jobs (default: CPU count)
    CUDA_HOME / CUDA_PATH             toolkit root (else nvcc on PATH)

Build: a small build.ninja under build/peft_kernels_C/ (one nvcc job per .cu, one c++ job for bindings.cpp, one
nvcc link with the static cudart), run with ``ninja -j MAX_JOBS``. Ninja tracks header dependencies (depfiles), so
a second build with unchanged sources and flags is a no-op, whether it comes from ``pip install``,
``pip install -e .`` or ``python setup.py build_ext --inplace``. ptxas' ``-v`` report of every object is kept next
to it as ``<object>.ptxas.log``; .ci/build_ext.sh fails on spills or stack frames from those logs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_DIR = ROOT / "build" / "peft_kernels_C"
CUDA_SOURCES = ["lora.cu", "lora_int8.cu", "prefix_kv.cu"]
CXX_SOURCES = ["bindings.cpp"]
DEFAULT_ARCHS = "80;90"


def _say(message: str) -> None:
    print(f"peft_kernels setup: {message}", file=sys.stderr)


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the `ninja` wheel (a build requirement) also ships the binary next to its module
        import ninja

        candidate = Path(ninja.BIN_DIR) / "ninja"
        return str(candidate) if candidate.is_file() else None
    except Exception:  # no ninja module: reported by the caller as a missing tool
        return None


def cuda_archs() -> tuple[list[str], str]:
    """(cubin archs like ["80", "90"], the PTX arch) from PEFT_KERNELS_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST."""
    spec = os.environ.get("PEFT_KERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    archs = []
    for item in re.split(r"[;\s,]+", spec.strip()):
        item = item.replace("+PTX", "").replace("sm_", "").replace("compute_", "").replace(".", "")
        if not item:
            continue
        if not re.fullmatch(r"\d{2,3}a?", item):
            raise ValueError(f"cannot read CUDA arch {item!r} in {spec!r} (expected e.g. '80;90' or '8.0;9.0+PTX')")
        if item not in archs:
            archs.append(item)
    archs.sort(key=lambda a: int(a.rstrip("a")))
    ptx = archs[-1].rstrip("a")
    return archs, ptx


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"V(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_build_ninja(nvcc: str, output: Path) -> Path:
    """build.ninja compiling csrc/ into ``output`` (the extension's .so); returns the file's path."""
    import pybind11  # a build requirement (pyproject.toml); imported only when the extension is built

    archs, ptx = cuda_archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    includes = [f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-DNDEBUG"]
    # -Xptxas -v: register/spill/stack report per kernel, captured per object for .ci/build_ext.sh.
    nvcc_flags = [*common, "-Xptxas", "-v", *gencode, f"-I{CSRC}"]
    defines = [
        f'-DPK_CUDA_ARCHS="{";".join(archs)}"',
        f'-DPK_CUDA_PTX="{ptx}"',
        f'-DPK_NVCC_VERSION="{nvcc_version(nvcc)}"',
    ]
    # bindings.cpp is host-only C++: nvcc hands a .cpp straight to the host compiler, adding the toolkit's include
    # directory (wherever nvcc lives, even behind a wrapper script), so no CUDA path has to be guessed here.
    cxx_flags = [*common, *includes, *defines]
    # Static cudart (nvcc's default) so the .so needs only the driver; --exclude-libs keeps cudart's symbols local,
    # so a libcudart that torch loaded globally can never interpose on ours (or ours on it).
    link_flags = ["-shared", "--cudart=static", "-Xlinker", "--exclude-libs,ALL"]

    objects = []
    lines = [
        "# Generated by setup.py; rebuilt on every build, edits are lost.",
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"nvcc_flags = {shlex.join(nvcc_flags)}",
        f"cxx_flags = {shlex.join(cxx_flags)}",
        f"link_flags = {shlex.join(link_flags)}",
        "",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out > $out.ptxas.log 2>&1 "
        "|| { cat $out.ptxas.log; exit 1; }",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "",
        "rule cxx",
        "  command = $nvcc $cxx_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "",
        "rule link",
        "  command = $nvcc $link_flags $in -o $out",
        "  description = LINK $out",
        "",
    ]
    # bindings.cpp first: pybind11 is the longest single compile (~45 s of the ~90 s on 2 busy cores), so it
    # should overlap the .cu jobs instead of running last.
    for name in CXX_SOURCES:
        obj = f"{name}.o"
        objects.append(obj)
        lines.append(f"build {obj}: cxx {_ninja_escape(str(CSRC / name))}")
    for name in CUDA_SOURCES:
        obj = f"{name}.o"
        objects.append(obj)
        lines.append(f"build {obj}: nvcc {_ninja_escape(str(CSRC / name))}")
    lines.append(f"build {_ninja_escape(str(output))}: link {' '.join(objects)}")
    lines.append(f"default {_ninja_escape(str(output))}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    path = BUILD_DIR / "build.ninja"
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:  # unchanged file: ninja keeps its up-to-date state
        path.write_text(text)
    return path


class NinjaBuildExt(build_ext):
    """build_ext that compiles peft_kernels._C with build.ninja instead of distutils' compilers."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "peft_kernels._C":
            return super().build_extension(ext)
        nvcc, ninja = find_nvcc(), find_ninja()
        if ninja is None:
            raise RuntimeError(
                "peft_kernels: ninja is needed to build the CUDA extension (pip install ninja), "
                "or set PEFT_KERNELS_SKIP_CUDA_BUILD=1 to install without it."
            )
        output = BUILD_DIR / "_C.so"
        write_build_ninja(nvcc, output)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _say(f"building peft_kernels._C with {nvcc} (archs {';'.join(cuda_archs()[0])}, ninja -j {jobs})")
        try:
            subprocess.run([ninja, "-C", str(BUILD_DIR), "-j", jobs], check=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"peft_kernels: building the CUDA extension failed (ninja exit {exc.returncode}); see the output "
                "above, or set PEFT_KERNELS_SKIP_CUDA_BUILD=1 to install without it."
            ) from exc
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output, target)


def extension_modules() -> list[Extension]:
    if os.environ.get("PEFT_KERNELS_SKIP_CUDA_BUILD", "") not in ("", "0"):
        _say("PEFT_KERNELS_SKIP_CUDA_BUILD is set: installing without the CUDA extension peft_kernels._C.")
        return []
    if find_nvcc() is None:
        _say("nvcc not found (CUDA_HOME or PATH): installing without the CUDA extension peft_kernels._C.")
        return []
    # Sources are listed for sdists and change detection only; NinjaBuildExt compiles them.
    sources = [f"csrc/{name}" for name in CUDA_SOURCES + CXX_SOURCES]
    return [Extension("peft_kernels._C", sources=sources)]


setup(ext_modules=extension_modules(), cmdclass={"build_ext": NinjaBuildExt})
