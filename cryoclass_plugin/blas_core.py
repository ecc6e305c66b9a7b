"""Pick OpenBLAS's compute kernels when OpenBLAS does not recognise the CPU.

numpy's bundled OpenBLAS chooses its kernels from the CPU model at load time.  A CPU
newer than the OpenBLAS build (e.g. an AVX-512 Xeon that numpy 1.26's OpenBLAS
0.3.23 reports as ``Prescott``) gets the generic SSE3 kernels,
and float32 GEMM, the E-step's main cost, runs 4-10x slower than the CPU allows
(docs/benchmarks.md, "GEMM rate and OpenBLAS kernels"; ``bench_gemm
--compare-coretypes``).

OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads, so this module sets
it from the CPU's instruction-set flags before numpy is imported (it is imported first
by the package ``__init__``; the engine's MPI ranks and the protocols' subprocesses
inherit the variable).  A value already set by the user is never changed, and
``CRYOCLASS_BLAS_CORE=keep`` disables the choice altogether.
"""
import os
import platform

# Kernel family -> CPU flags (``/proc/cpuinfo``) that its code uses.  Checked in order;
# SkylakeX kernels use AVX-512 F/CD/BW/DQ/VL, Haswell kernels AVX2 and FMA.
_CORES = [
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
]


def cpu_flags(cpuinfo_text):
    """The set of flags on the first ``flags`` line of ``/proc/cpuinfo`` text."""
    for line in cpuinfo_text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def core_for_flags(flags):
    """The best OpenBLAS kernel family these CPU flags can run, or None."""
    for name, needed in _CORES:
        if needed <= flags:
            return name
    return None


def choose_openblas_core(environ=None, cpuinfo_path="/proc/cpuinfo"):
    """Set ``OPENBLAS_CORETYPE`` in ``environ`` (default ``os.environ``) from the CPU
    flags if it is unset; return the value in force afterwards (or None)."""
    env = os.environ if environ is None else environ
    if "OPENBLAS_CORETYPE" in env:
        return env["OPENBLAS_CORETYPE"]
    if env.get("CRYOCLASS_BLAS_CORE", "").lower() == "keep":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open(cpuinfo_path) as fh:
            core = core_for_flags(cpu_flags(fh.read()))
    except OSError:
        return None
    if core is not None:
        env["OPENBLAS_CORETYPE"] = core
    return core
