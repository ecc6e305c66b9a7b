"""OpenBLAS kernel choice from the CPU flags (cryoclass_plugin.blas_core)."""
import os
import subprocess
import sys

from cryoclass_plugin import blas_core

AVX512 = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
OLD = "flags\t\t: fpu sse sse2 sse3\n"


def test_core_for_flags():
    assert blas_core.core_for_flags(blas_core.cpu_flags(AVX512)) == "SkylakeX"
    assert blas_core.core_for_flags(blas_core.cpu_flags(AVX2)) == "Haswell"
    assert blas_core.core_for_flags(blas_core.cpu_flags(OLD)) is None
    # AVX-512 F alone (no BW/VL) cannot run SkylakeX kernels.
    assert blas_core.core_for_flags({"avx512f", "avx2", "fma"}) == "Haswell"


def test_choose_respects_user_value_and_keep(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX512)
    env = {"OPENBLAS_CORETYPE": "Haswell"}
    assert blas_core.choose_openblas_core(env, str(info)) == "Haswell"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    env = {"CRYOCLASS_BLAS_CORE": "keep"}
    assert blas_core.choose_openblas_core(env, str(info)) is None
    assert "OPENBLAS_CORETYPE" not in env
    env = {}
    expected = "SkylakeX" if blas_core.platform.machine().lower() in ("x86_64", "amd64") else None
    assert blas_core.choose_openblas_core(env, str(info)) == expected
    assert blas_core.choose_openblas_core({}, str(tmp_path / "missing")) is None


def test_engine_process_loads_the_chosen_kernels():
    """A fresh interpreter that imports the package before numpy runs OpenBLAS with the
    kernels chosen from this machine's flags."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "CRYOCLASS_BLAS_CORE")}
    code = ("import os, cryoclass_plugin, numpy, threadpoolctl;"
            "info = [i for i in threadpoolctl.threadpool_info() if i.get('internal_api') == 'openblas'];"
            "print(os.environ.get('OPENBLAS_CORETYPE'), info[0].get('architecture') if info else None)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    chosen, used = out
    if chosen != "None" and used != "None":
        assert used.lower() == chosen.lower()
