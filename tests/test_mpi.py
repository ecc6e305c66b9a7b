"""``mpirun -np N cryoclass refine``: the particles are split over ranks, the sums
reduced; 1, 2 and 3 ranks give the same classes and maps (up to summation order), and a
rank that fails makes the whole job exit non-zero instead of hanging."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import starfile

from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.simulate import simulate_dataset

BIN = os.path.dirname(sys.executable)
MPIRUN = shutil.which("mpirun", path=BIN) or shutil.which("mpirun")
#: Several ranks under mpirun: part of the full suite, not the everyday subset.
pytestmark = [pytest.mark.skipif(MPIRUN is None, reason="no mpirun"), pytest.mark.slow]


def mpi_env():
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    return env


def run_ranks(n, data, root, *extra, timeout=600, entry=("-m", "cryoclass_plugin.engine")):
    cmd = [MPIRUN, "--oversubscribe", "-np", str(n), sys.executable, *entry,
           "refine", "--i", str(data / "particles.star"),
           "--ref", str(data / "ref.mrc"), "--o", str(root), "--K", "2", "--iter", "2",
           "--tau2_fudge", "4", "--ini_high", "40", "--particle_diameter", "200",
           "--zero_mask", "--ctf", "--healpix_order", "1", "--offset_range", "2",
           "--offset_step", "2", "--block_size", "50", *extra]
    return subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


#: Runs ``cryoclass refine`` with the E-step of rank 1 replaced by one that raises.
FAILING_RANK_SCRIPT = """
import sys
from cryoclass_plugin import cli
from cryoclass_plugin.engine import iteration

original = iteration.expectation

def failing(ctx, *args, **kwargs):
    if ctx.comm.rank == 1:
        raise RuntimeError("failure injected by tests/test_mpi.py")
    return original(ctx, *args, **kwargs)

iteration.expectation = failing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    simulate_dataset(str(out), n=120, box=32, apix=7.0, snr=1.0, n_classes=2, seed=5)
    return out


def test_one_two_three_ranks_agree(data, tmp_path):
    results = {}
    for n in (1, 2, 3):
        root = tmp_path / f"np{n}" / "run"
        proc = run_ranks(n, data, root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        part = starfile.read(f"{root}_it002_data.star")["particles"]
        maps = [read_map(f"{root}_it002_class{k:03d}.mrc")[0] for k in (1, 2)]
        results[n] = (part, maps)
    ref_part, ref_maps = results[1]
    for n in (2, 3):
        part, maps = results[n]
        assert (part["rlnClassNumber"].to_numpy() == ref_part["rlnClassNumber"].to_numpy()).all()
        for a, b in zip(ref_maps, maps):
            assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_failing_rank_makes_the_job_exit_nonzero(data, tmp_path):
    # Rank 1 raises inside its E-step (a wrapper script replaces the function): the job
    # must abort with a non-zero status, not hang in a collective.
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK_SCRIPT)
    proc = run_ranks(2, data, tmp_path / "fail" / "run", timeout=300, entry=(str(script),))
    assert proc.returncode != 0
    assert "failure injected by tests/test_mpi.py" in proc.stderr
    assert "rank 1 failed" in proc.stderr


def test_merge_test_is_the_same_on_one_and_two_ranks(data, tmp_path):
    """The held-out merge test (engine/merge.py) splits its particles over the ranks and
    reduces the back-projections and scores: its figures and decision do not depend on
    the number of ranks.  K=3 on two true classes: a pair is one structure."""
    import re
    extra = ["--K", "3", "--iter", "7", "--init_classes", "pca", "--consensus_iter", "2",
             "--consensus_extra_iter", "0", "--classify_fixed_iter", "4"]
    lines, checks = {}, {}
    for n in (1, 2):
        root = tmp_path / f"np{n}" / "run"
        proc = run_ranks(n, data, root, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(f"{root}.log") as fh:
            log = fh.readlines()
        lines[n] = [line for line in log if line.startswith(("merge test", "merge:"))]
        checks[n] = [line for line in log if line.startswith("fixed-pose check")]
    # The fixed-pose checks (the same pair evidence, summed) before iterations 5 and 6.
    assert len(checks[1]) == 2 and "first reading" in checks[1][0], checks[1]
    assert [line.rsplit(";", 1)[1].split(":")[-1] for line in checks[1]] == \
        [line.rsplit(";", 1)[1].split(":")[-1] for line in checks[2]]     # the decisions
    assert np.allclose(*[[float(line.split("split evidence ")[1].split()[0]) for line in
                          checks[n]] for n in (1, 2)], atol=0.03), (checks[1], checks[2])
    assert len(lines[1]) == 4, lines[1]              # three pairs, one merge
    assert [line.split("(")[0] for line in lines[1]] == [line.split("(")[0] for line in lines[2]]
    numbers = [[float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)] for line in lines[1][:3]]
    numbers2 = [[float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)] for line in lines[2][:3]]
    assert np.allclose(numbers, numbers2, atol=0.011), (lines[1], lines[2])
    assert lines[1][3] == lines[2][3]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_to_mpirun_prints_one_message_and_continue_works(data, tmp_path, signame):
    """A queue's time limit (SIGTERM) or Ctrl-C (SIGINT) signals mpirun: the user reads one line naming the last
    complete iteration (Open MPI's launcher stops forwarding its ranks' output when it is
    signalled, so rank 0 writes to the launcher's standard error), and --continue works."""
    import signal
    import time
    from cryoclass_plugin.engine import run_guard
    root = tmp_path / "run"
    cmd = [MPIRUN, "--oversubscribe", "-np", "2", sys.executable, "-m", "cryoclass_plugin.engine",
           "refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
           "--o", str(root), "--iter", "200", "--healpix_order", "1", "--offset_range", "0",
           "--j", "1", "--block_size", "50"]
    proc = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while run_guard.last_complete_iteration(str(root)) in (None, 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # Open MPI's launcher passes Ctrl-C on to the ranks as SIGTERM
    lines = [line for line in (out + err).splitlines() if "terminated (SIGTERM)" in line]
    assert len(lines) == 1, out + err
    assert "--continue" in lines[0] and "Traceback" not in out + err
    last = run_guard.last_complete_iteration(str(root))
    assert f"last complete iteration is {last}" in open(f"{root}.log").read()
    assert not os.path.exists(f"{root}.lock")
    cont = subprocess.run([sys.executable, "-m", "cryoclass_plugin.engine", "refine",
                           "--continue", f"{root}_it{last:03d}_optimiser.star",
                           "--iter", str(last + 1), "--j", "1"],
                          capture_output=True, text=True, timeout=300)
    assert cont.returncode == 0, cont.stderr
