"""``cryoclass simulate OUT``: a heterogeneous particle data set with ground truth.

Writes OUT/particles.star + particles.mrcs (RELION 3.1, no angles), OUT/ref.mrc (consensus
reference low-passed to 30 A), OUT/true_classKKK.mrc, OUT/truth.star and
OUT/truth_summary.json, and prints the oracle accuracy (see
:mod:`cryoclass_plugin.engine.simulate` for the model and the SNR definition).
"""


def _fractions(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"'{text}' is not a comma-separated list of numbers") from None
    return values


def add_args(parser):
    parser.add_argument("out", metavar="OUT", help="output folder (created)")
    parser.add_argument("--n", type=int, default=2000, help="number of particles (2000)")
    parser.add_argument("--box", type=int, default=64, help="box size in pixels, even (64)")
    parser.add_argument("--apix", type=float, default=4.0, help="pixel size in A (4.0)")
    parser.add_argument("--snr", type=float, default=0.05,
                        help="signal-to-noise ratio: mean variance of the noise-free CTF-"
                             "affected images over the box / noise variance (0.05; 'inf' "
                             "for noise-free images)")
    parser.add_argument("--classes", type=int, default=3, help="number of classes (3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--fractions", type=_fractions, default=None,
                        help="class fractions, e.g. 0.5,0.3,0.2 (default: equal)")
    parser.add_argument("--micrographs", type=int, default=10,
                        help="number of fake micrographs the particles come from (10)")
    parser.add_argument("--max_shift", type=float, default=3.0,
                        help="origins uniform in +-max_shift pixels per axis (3)")
    parser.add_argument("--hinge", type=float, default=20.0,
                        help="rotation (degrees) of the hinged subunit in class 3 (20)")
    parser.add_argument("--no_ctf", action="store_true",
                        help="no CTF (and no defocus columns in particles.star)")
    parser.add_argument("--norm_spread", type=float, default=0.0,
                        help="per-particle intensity variation: each whole image (signal "
                             "and noise) times a log-normal factor of this spread, the "
                             "truth in truth.star rlnNormCorrection (0 = none; test of "
                             "refine --norm)")
    parser.add_argument("--scale_spread", type=float, default=0.0,
                        help="per-micrograph signal scale: each micrograph's signal times a "
                             "log-normal factor of this spread, the truth in truth.star "
                             "data_groups (0 = none; test of refine --scale)")


def main(args):
    from ..engine.simulate import simulate_dataset
    result = simulate_dataset(
        args.out, n=args.n, box=args.box, apix=args.apix, snr=args.snr,
        n_classes=args.classes, seed=args.seed, class_fractions=args.fractions,
        n_micrographs=args.micrographs, max_shift_px=args.max_shift,
        apply_ctf=not args.no_ctf, hinge_deg=args.hinge, log=print,
        norm_spread=args.norm_spread, scale_spread=args.scale_spread)
    print(f"oracle_accuracy {result['oracle_accuracy']:.4f}")
    print(f"oracle_accuracy_25A {result['oracle_accuracy_25A']:.4f}")
    print(f"class sizes {' '.join(str(s) for s in result['class_sizes'])}")
    print(f"wrote {result['particles_star']}, {result['ref']}, {result['truth_star']}, "
          f"{result['summary']}")
    return 0
