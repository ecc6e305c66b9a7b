"""This machine's single-precision matrix-product rate at the E-step's shapes.

    .venv/bin/python benchmarks/bench_gemm.py            # numpy (BLAS) float32
    .venv/bin/python benchmarks/bench_gemm.py --quick    # one size
    .venv/bin/python benchmarks/bench_gemm.py --gpu      # also CuPy, where cupy + a GPU exist
    .venv/bin/python benchmarks/bench_gemm.py --compare-coretypes   # OpenBLAS kernels
    .venv/bin/python benchmarks/bench_gemm.py --estep    # the E-step's own rate vs SGEMM

The E-step scores all (image x translation) rows against all (orientation x class)
projections with one real GEMM per block: ``(B*T, 2n) @ (2n, M)``, where B*T ~ 2000
shifted images, n ~ 500-1500 Fourier pixels (real and imaginary parts side by side: 2n)
and M ~ 5000-20000 projections.  A product of (m, k) by (k, n) costs 2 m k n flops.

Other scripts can import the rate::

    from bench_gemm import measure_sgemm_gflops      # benchmarks/ on sys.path
    gflops = measure_sgemm_gflops()                  # best of a few, numpy float32

Prints a table of GFLOP/s per shape (best and median of ``--repeats`` timed products
after one warm-up); ``--markdown`` also prints it in the format of docs/benchmarks.md.  The
output goes to the run log (``scratch/benchmark_runs.md``; ``--no-record`` skips it).

OpenBLAS chooses its kernels from the CPU model when it loads; a model newer than the
OpenBLAS release (numpy 1.26's OpenBLAS 0.3.23 on family 6 model 207, "Intel Xeon
Processor" in a VM) falls back to the generic "Prescott" (SSE3) kernels, several times
slower.  ``--compare-coretypes`` re-runs the measurement in fresh interpreters with
OPENBLAS_CORETYPE unset and set to a few core names, so the loss is visible.
"""
import argparse
import os
import statistics
import sys
import time

# (rows = B*T, inner = 2n, cols = M)
DEFAULT_SHAPES = [(2000, 1000, 5000), (2000, 2000, 10000), (2000, 3000, 20000)]
QUICK_SHAPES = [(2000, 1000, 5000)]


def _timings_numpy(m, k, n, repeats, threads=None, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    limiter = None
    if threads:
        try:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(limits=int(threads), user_api="blas")
        except ImportError:
            pass
    try:
        np.matmul(a, b, out=out)  # warm-up (thread pool start, page faults)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        if limiter is not None:
            limiter.unregister()
    return times


def _timings_cupy(m, k, n, repeats, seed=0):
    import cupy as cp
    rs = cp.random.RandomState(seed)
    a = rs.standard_normal((m, k), dtype=cp.float32)
    b = rs.standard_normal((k, n), dtype=cp.float32)
    out = cp.empty((m, n), dtype=cp.float32)
    cp.matmul(a, b, out=out)
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        cp.matmul(a, b, out=out)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1000.0)
    return times


def measure_sgemm_gflops(m=2000, k=2000, n=10000, repeats=3, threads=None, backend="numpy",
                         stat="best"):
    """GFLOP/s of a float32 ``(m, k) @ (k, n)`` product (2 m k n flops).

    ``backend`` 'numpy' (the BLAS numpy links, ``threads`` BLAS threads via threadpoolctl;
    default: BLAS's own default) or 'cupy' (cuBLAS on the current GPU, timed with CUDA
    events).  ``stat`` 'best' (default) or 'median' of ``repeats`` timed products after
    one warm-up."""
    if backend == "cupy":
        times = _timings_cupy(m, k, n, repeats)
    elif backend == "numpy":
        times = _timings_numpy(m, k, n, repeats, threads)
    else:
        raise ValueError(f"backend {backend!r}: use 'numpy' or 'cupy'")
    t = min(times) if stat == "best" else statistics.median(times)
    return 2.0 * m * k * n / t / 1e9


def cupy_available():
    try:
        import cupy as cp
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def blas_name():
    try:
        import numpy  # noqa: F401  (load the BLAS first)
        from threadpoolctl import threadpool_info
        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if infos:
            i = infos[0]
            return (f"{i.get('internal_api')} {i.get('version')} "
                    f"({i.get('num_threads')} threads, {i.get('architecture')})")
    except Exception:
        pass
    return "unknown BLAS"


def gpu_name():
    try:
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return "unknown GPU"


COMPARE_CORETYPES = [None, "Haswell", "SkylakeX", "Cooperlake", "SapphireRapids"]


def compare_coretypes(shapes, repeats):
    """Rows of the same measurement in fresh interpreters per OPENBLAS_CORETYPE."""
    import json
    import subprocess
    rows = []
    for core in COMPARE_CORETYPES:
        env = dict(os.environ)
        env.pop("OPENBLAS_CORETYPE", None)
        if core:
            env["OPENBLAS_CORETYPE"] = core
        code = ("import json,sys; sys.path.insert(0, %r)\n"
                "import bench_gemm as g\n"
                "out = [g.blas_name()]\n"
                "for m,k,n in %r:\n"
                "    out.append(g.measure_sgemm_gflops(m,k,n,repeats=%d))\n"
                "print(json.dumps(out))\n") % (os.path.dirname(os.path.abspath(__file__)),
                                                 list(shapes), repeats)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True)
        try:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"OPENBLAS_CORETYPE={core}: failed: {res.stderr[-500:]}")
            continue
        arch = out[0].split("threads, ")[-1].rstrip(")")
        row = [core or "(unset)", arch] + [f"{g:.1f}" for g in out[1:]]
        rows.append(row)
        print("  " + "  ".join(row), flush=True)
    headers = ["OPENBLAS_CORETYPE", "core used"] + [f"{m}x{k}x{n} GFLOP/s"
                                                    for m, k, n in shapes]
    return headers, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"one shape {QUICK_SHAPES[0]}")
    p.add_argument("--shape", nargs=3, type=int, action="append", metavar=("ROWS", "INNER",
                                                                          "COLS"),
                   help="a (ROWS, INNER) @ (INNER, COLS) product; repeatable")
    p.add_argument("--repeats", type=int, default=3, help="timed products per shape (3)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="BLAS thread counts to try (default: BLAS's default only)")
    p.add_argument("--gpu", action="store_true", help="also CuPy (needs cupy and a GPU)")
    p.add_argument("--gpu-only", action="store_true", help="CuPy only (implies --gpu)")
    p.add_argument("--compare-coretypes", action="store_true",
                   help="also measure with OPENBLAS_CORETYPE unset / "
                        + " / ".join(c for c in COMPARE_CORETYPES if c))
    p.add_argument("--estep", action="store_true",
                   help="also time the E-step's scoring calls (estep.log_likelihoods, the "
                        "coarse pass; estep.own_slice_scores, the fine pass) at the tutorial "
                        "job's shapes and print their rate as a share of the SGEMM rate")
    p.add_argument("--no-record", action="store_true",
                   help="do not append to the run log (scratch/benchmark_runs.md)")
    p.add_argument("--markdown", action="store_true",
                   help="also print the tables in the format of docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.estep:
        # The engine picks OpenBLAS's kernels (OPENBLAS_CORETYPE) before numpy loads; the
        # SGEMM rate it is compared with must use the same kernels.
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import cryoclass_plugin  # noqa: F401
    args.gpu = args.gpu or args.gpu_only
    shapes = [tuple(s) for s in args.shape] if args.shape else \
        (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)

    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C
    info = C.machine_info()
    print(f"machine: {C.machine_line(info)}")
    print(f"numpy {np.__version__}, BLAS: {blas_name()}")
    rows = []
    for threads in ([] if args.gpu_only else (args.threads or [None])):
        for m, k, n in shapes:
            times = _timings_numpy(m, k, n, args.repeats, threads)
            flops = 2.0 * m * k * n
            rows.append([f"numpy f32 ({threads or 'default'} thr)", f"{m} x {k} x {n}",
                         f"{flops / 1e9:.0f}", f"{min(times) * 1e3:.1f}",
                         f"{flops / min(times) / 1e9:.1f}",
                         f"{flops / statistics.median(times) / 1e9:.1f}"])
            print(C.format_table(HEADERS, rows[-1:]), flush=True)
    gpu_note = None
    if args.gpu:
        if cupy_available():
            import cupy as cp
            gpu_note = f"GPU: {gpu_name()}, CuPy {cp.__version__}"
            print(gpu_note)
            for m, k, n in shapes:
                times = _timings_cupy(m, k, n, max(args.repeats, 10))
                flops = 2.0 * m * k * n
                rows.append([f"cupy f32 (GPU)", f"{m} x {k} x {n}", f"{flops / 1e9:.0f}",
                             f"{min(times) * 1e3:.2f}", f"{flops / min(times) / 1e9:.1f}",
                             f"{flops / statistics.median(times) / 1e9:.1f}"])
                print(C.format_table(HEADERS, rows[-1:]), flush=True)
        else:
            gpu_note = "CuPy variant not run: cupy not importable or no GPU"
            print(gpu_note)
    extra, md_after = [], []
    if args.estep:
        peak = max(float(r[4]) for r in rows if r[0].startswith("numpy")) if rows else None
        lines = estep_rates(args.repeats, peak)
        extra += [""] + lines
        md_after += ["\n".join(lines)]
    if args.compare_coretypes:
        print("\nOpenBLAS core types (fresh interpreter each, best of "
              f"{args.repeats}):", flush=True)
        headers, crow = compare_coretypes(shapes, args.repeats)
        extra += ["", "OpenBLAS kernels by OPENBLAS_CORETYPE (GFLOP/s, best of "
                  f"{args.repeats}):", C.format_table(headers, crow)]
        md_after += [C.markdown_table(headers, crow)]
    body = "\n".join([f"numpy {np.__version__}, BLAS: {blas_name()}"] +
                     ([gpu_note] if gpu_note else []) +
                     ["", C.format_table(HEADERS, rows), "",
                      "shape = rows x inner x cols of (rows, inner) @ (inner, cols); "
                      "GFLOP = 2 rows inner cols / 1e9; best / median of "
                      f"{args.repeats} timed products after a warm-up (GPU: >= 10, CUDA "
                      "events)"] + extra)
    print("\n" + body)
    if args.markdown:
        C.print_markdown(["backend", "shape (rows x inner x cols)", "GFLOP/s best",
                          "GFLOP/s median"], [[r[0], r[1], r[4], r[5]] for r in rows], info,
                         [f"numpy {np.__version__}, BLAS: {blas_name()}"
                          + (f"; {gpu_note}" if gpu_note else "") + f"; best / median of "
                          f"{args.repeats} timed products after a warm-up."],
                         after="\n\n".join(md_after))
    if not args.no_record:
        C.append_results("bench_gemm", [], body, info)
    return 0


HEADERS = ["backend", "shape", "GFLOP", "best ms", "GFLOP/s best", "GFLOP/s median"]

# The tutorial job's E-step (64 px, K=4, 7.5 deg, offsets 5 / 2 px): a block of B=256
# particles x T=21 translations against M = K x 4608 coarse rotations at n ~ 230 coarse
# pixels; the fine pass: 64 particles x 9 translations x ~200 own rotations at n ~ 1500.
ESTEP_COARSE = [(256, 21, 230, 4 * 4608), (256, 21, 600, 4 * 4608)]
ESTEP_FINE = [(64, 9, 1500, 200)]


def estep_rates(repeats, peak):
    """Rates of the E-step's two scoring calls (numpy) against ``peak`` GFLOP/s."""
    import numpy as np
    from cryoclass_plugin.engine import estep
    rng = np.random.default_rng(0)

    def cplx(*shape):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)

    def best(fn):
        fn()
        times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    lines = ["E-step scoring calls (numpy float32; GFLOP counts the GEMMs only):"]
    for B, T, n, M in ESTEP_COARSE:
        w, pw = cplx(B, n), rng.standard_normal((B, n)).astype(np.float32)
        const, shifts = np.zeros(B, np.float32), cplx(T, n)
        pair = rng.standard_normal((M, 2 * n)).astype(np.float32)
        power = rng.standard_normal((M, n)).astype(np.float32)
        sec = best(lambda: estep.log_likelihoods(w, pw, const, shifts, pair, power))
        gf = (2.0 * B * T * 2 * n * M + 2.0 * B * n * M) / sec / 1e9
        share = f" = {100 * gf / peak:.0f}% of the SGEMM rate above" if peak else ""
        lines.append(f"  coarse  log_likelihoods B,T,n,M={B},{T},{n},{M}: {sec * 1e3:.0f} ms, "
                     f"{gf:.1f} GFLOP/s{share}")
    for B, T, n, R in ESTEP_FINE:
        x, c = cplx(B, n), rng.standard_normal((B, n)).astype(np.float32)
        isg = np.ones((B, n), np.float32)
        shifts, slices = cplx(B, T, n), cplx(B, R, n)
        power = (slices.real ** 2 + slices.imag ** 2).astype(np.float32)
        sec = best(lambda: estep.own_slice_scores(x, c, isg, shifts, slices, power, False))
        gf = (2.0 * B * T * 2 * n * R + 2.0 * B * n * R) / sec / 1e9
        share = f" = {100 * gf / peak:.0f}% of the SGEMM rate above" if peak else ""
        lines.append(f"  fine    own_slice_scores B,T,n,R={B},{T},{n},{R}: {sec * 1e3:.0f} ms, "
                     f"{gf:.1f} GFLOP/s{share}")
    for line in lines:
        print(line, flush=True)
    return lines

if __name__ == "__main__":
    sys.exit(main())
