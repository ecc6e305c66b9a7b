"""``cryoclass refine`` with the recommended start's split replaced by the true states:
what the rest of the pipeline (fixed-pose EM, merge test, full EM) keeps of a perfect
split.  A diagnostic for ``bench_states --starts truth``; not a way to run real data.

    python benchmarks/split_from_truth.py truth.star -- refine flags... --init_classes pca

The k-means of the PCA split (``heterogeneity.kmeans``) still runs, so the log keeps
its class sizes, but each particle then starts in its true state's class (``truth.star``'s
``rlnClassNumber``, in the order of the particles' STAR file, as the simulator writes
both).
"""
import sys

import numpy as np
import starfile


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    truth_star, refine_args = argv[0], argv[argv.index("--") + 1:]
    if "pca" not in refine_args:
        print("split_from_truth: needs --init_classes pca among the refine flags",
              file=sys.stderr)
        return 2
    truth = starfile.read(truth_star)["particles"]["rlnClassNumber"].to_numpy(int) - 1

    import cryoclass_plugin.engine.heterogeneity as heterogeneity
    from cryoclass_plugin.cli import main as cryoclass_main
    kmeans = heterogeneity.kmeans

    def true_states(points, k, seed=0, **kw):
        found = kmeans(points, k, seed=seed, **kw)
        if len(found) != len(truth) or truth.max() >= k:
            raise SystemExit(f"split_from_truth: {len(found)} particles and K={k}, "
                             f"truth has {len(truth)} and {truth.max() + 1} states")
        print(f"split_from_truth: k-means sizes {np.bincount(found, minlength=k).tolist()} "
              f"replaced by the true states {np.bincount(truth, minlength=k).tolist()}",
              flush=True)
        return truth.copy()

    heterogeneity.kmeans = true_states
    return cryoclass_main(["refine"] + refine_args)


if __name__ == "__main__":
    sys.exit(main())
