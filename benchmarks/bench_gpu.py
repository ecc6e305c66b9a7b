"""GPU (CuPy) benchmark: the E-step GEMM rate against the card's SGEMM peak, and the
tutorial-sized job (5000 particles, 64 px, K=4, 25 iterations) with ``--gpu``.

    python benchmarks/bench_gpu.py [--n 5000] [--iter 25] [--workdir scratch/bench_gpu]

Prints the figures; ``--markdown`` also prints them as the table of docs/benchmarks.md
(section "GPU").
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def gemm_rate(cp, m, k, n, reps=10):
    a = cp.random.standard_normal((m, k), dtype=cp.float32)
    b = cp.random.standard_normal((k, n), dtype=cp.float32)
    a @ b
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    cp.cuda.Device().synchronize()
    return 2.0 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def estep_rate(cp, B=256, T=21, n=230, M=18432, reps=5):
    from cryoclass_plugin.engine import estep
    rng = cp.random.default_rng(0)
    w = (rng.standard_normal((B, n), dtype=cp.float32) + 1j * rng.standard_normal((B, n), dtype=cp.float32)).astype(cp.complex64)
    pw = rng.standard_normal((B, n), dtype=cp.float32)
    const = cp.zeros(B, dtype=cp.float32)
    shifts = cp.ones((T, n), dtype=cp.complex64)
    pair = rng.standard_normal((M, 2 * n), dtype=cp.float32)
    power = rng.standard_normal((M, n), dtype=cp.float32)
    estep.log_likelihoods(w, pw, const, shifts, pair, power)
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        estep.log_likelihoods(w, pw, const, shifts, pair, power)
    cp.cuda.Device().synchronize()
    flops = 2.0 * (B * T) * (2 * n) * M + 2.0 * B * n * M
    return flops * reps / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--workdir", default="scratch/bench_gpu")
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--skip-gemm", action="store_true", help="skip the GEMM-rate measurements")
    ap.add_argument("--profile", metavar="FILE", default=None,
                    help="run the refine under cProfile, write the stats to FILE and print "
                         "the 30 functions with the most own time")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the figures as the table of docs/benchmarks.md")
    a = ap.parse_args()
    import cupy as cp
    print("device:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    figures = []                     # (what was measured, figure) for --markdown
    if not a.skip_gemm:
        peak = gemm_rate(cp, 8192, 8192, 8192)
        print(f"SGEMM peak (8192^3 float32): {peak:.0f} GFLOP/s")
        figures.append(("SGEMM, 8192^3 float32", f"{peak / 1e3:.1f} TFLOP/s"))
        for shape in [(256, 21, 230, 18432), (256, 21, 600, 18432)]:
            r = estep_rate(cp, *shape)
            print(f"E-step coarse GEMMs B,T,n,M={shape}: {r:.0f} GFLOP/s = "
                  f"{100 * r / peak:.0f}% of SGEMM peak")
            figures.append((f"E-step coarse GEMMs, B,T,n,M = {','.join(map(str, shape))}",
                            f"{r / 1e3:.1f} TFLOP/s ({100 * r / peak:.0f} % of SGEMM)"))
    from cryoclass_plugin.engine.simulate import simulate_dataset
    from cryoclass_plugin.engine.metrics import adjusted_rand_index
    import starfile
    os.makedirs(a.workdir, exist_ok=True)
    t = time.time()
    info = simulate_dataset(a.workdir, n=a.n, box=64, apix=4.0, snr=0.05, n_classes=3, seed=0)
    print(f"simulated {a.n} particles in {time.time() - t:.0f} s; oracle {info['oracle_accuracy']:.3f}")
    prof = ["-m", "cProfile", "-o", a.profile] if a.profile else []
    cmd = [sys.executable, *prof, "-m", "cryoclass_plugin.engine", "refine",
           "--i", f"{a.workdir}/particles.star", "--ref", f"{a.workdir}/ref.mrc",
           "--o", f"{a.workdir}/gpu/run", "--K", "4", "--tau2_fudge", "4", "--iter", str(a.iter),
           "--ini_high", "50", "--firstiter_cc", "--particle_diameter", "200", "--zero_mask", "--flatten_solvent",
           "--ctf", "--healpix_order", "2", "--oversampling", "1", "--offset_range", "5",
           "--offset_step", "2", "--pad", "2", "--skip_gridding", "--preread_images",
           "--gpu", "0", "--block_size", "1024"]
    print("command:", " ".join(cmd), flush=True)
    t = time.time()
    proc = subprocess.run(cmd, timeout=a.timeout)
    wall = time.time() - t
    print(f"cryoclass refine --gpu: rc {proc.returncode}, wall {wall:.1f} s")
    if a.profile and os.path.exists(a.profile):
        import pstats
        pstats.Stats(a.profile).sort_stats("tottime").print_stats(30)
    import glob
    last = sorted(glob.glob(f"{a.workdir}/gpu/run_it*_data.star"))[-1]
    truth = starfile.read(f"{a.workdir}/truth.star")
    truth = truth["particles"] if isinstance(truth, dict) else truth
    d = starfile.read(last)["particles"]
    ari = adjusted_rand_index(truth["rlnClassNumber"].to_numpy(), d["rlnClassNumber"].to_numpy())
    n_poses = 4 * 4608 * 21
    print(f"last {os.path.basename(last)}: ARI {ari:.3f}; coarse particle x poses per second "
          f"{a.n * n_poses * a.iter / wall:.3g}")
    figures.append((f"cryoclass refine --gpu, {a.n} particles, 64 px, K=4, {a.iter} iterations "
                    "(RELION's start, --firstiter_cc)",
                    f"{wall:.1f} s wall (rc {proc.returncode}); ARI {ari:.3f} at "
                    f"{os.path.basename(last)}"))
    if a.markdown:
        C.print_markdown(["measured", "figure"], [list(f) for f in figures], notes=[
            f"Device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}; CuPy "
            f"{cp.__version__}, numpy {np.__version__}."])


if __name__ == "__main__":
    main()
