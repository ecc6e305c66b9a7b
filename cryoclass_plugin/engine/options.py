"""The run's options (:class:`Settings`), named as RELION's command-line flags."""
from dataclasses import dataclass


@dataclass
class Settings:
    """The run's options, named as RELION's command-line flags."""
    input_star: str
    output_root: str
    ref: str
    n_classes: int = 1
    tau2_fudge: float = 1.0
    n_iter: int = 25
    ini_high: float = -1.0
    firstiter_cc: bool = False
    particle_diameter: float = -1.0
    zero_mask: bool = False
    flatten_solvent: bool = False
    solvent_mask: str = ""
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    sym: str = "C1"
    healpix_order: int = 2
    oversampling: int = 1
    offset_range: float = 6.0
    offset_step: float = 2.0
    strict_highres_exp: float = -1.0
    fast_subsets: bool = False
    norm: bool = False
    scale: bool = False
    pad: int = 2
    gridding: bool = True
    preread_images: bool = False
    scratch_dir: str = ""
    pool: int = 1
    threads: int = 1
    gpu: str = None
    random_seed: int = 0
    continue_from: str = ""
    skip_align: bool = False
    incr_size: int = 10
    adaptive_fraction: float = 0.999
    max_significant: int = 2000
    block_size: int = 256
    fine_table_bytes: float = 4e9   # memory for the fine projections + slice sums
    cache_bytes: float = 1e9        # keep prepared images between the two passes
    init_classes: str = "relion"   # relion | input | consensus (see Refinement.run)
    consensus_iter: int = 5
    consensus_extra_iter: int = 6   # ... up to this many more while the poses still move
    restarts: int = 3
    restart_iter: int = 6
    restart_highres: float = 25.0
    classify_fixed_iter: int = 8    # consensus|pca: fixed-pose iterations after the split
    classify_fixed_highres: float = 25.0   # their E-step resolution limit (A)
    sigma_ang: float = -1.0         # > 0: local angular searches, prior sigma (deg)
    classify_local_sigma: float = 5.0   # consensus|pca: local searches after the split (deg)
    classify_local_order: int = -1      # ... on this HEALPix order (-1: --healpix_order + 1)
    consensus_local_iter: int = 2       # the last consensus iterations search locally too
    class_difference_highres: float = 25.0   # consensus|pca: references share the consensus (A)
    joint_consensus: bool = True    # ... a consensus reconstructed from all classes' sums
    auto_mask_sigma: float = -1.0   # E-step references masked around their density
                                    # (threshold in robust sigmas; 0 off; < 0: 3 with a
                                    # consensus|pca start, off with RELION's)
    tau2_estimate: str = "power"    # "power" (RELION) or "em" (+ posterior variance)
    consensus_tau2_estimate: str = ""   # ... of the consensus map ("": as tau2_estimate)
    merge_threshold: float = 0.3    # consensus|pca: merge classes the held-out test calls
                                    # one structure (0: off; :mod:`.merge`)
    merge_fixed_iter: int = 3       # ... then this many more fixed-pose iterations
