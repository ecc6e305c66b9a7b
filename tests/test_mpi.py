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


#: Under mpirun: the lumped state of tests/test_subsplit.py (a state inside another
#: state's class, two classes empty) and its split within classes; rank 0 prints the log.
SPLIT_SCRIPT = """
import copy, sys
from dataclasses import replace
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import refinement_at_true_poses
data = Path(sys.argv[1])
r, model, truth = refinement_at_true_poses(data, 5, 220)
states = truth["rlnClassNumber"].to_numpy() - 1
lumped = np.where(states == 3, 2, states)
model.current_shell = 16
for it in (1, 2):
    model = r.iterate(model, replace(r.plan(model, it), search="none", write=False),
                      allowed=lumped)
lines = []
r.log = lines.append
r._split_into_empty(model)
if r.comm.rank == 0:
    print("\\n".join(line for line in lines if line.startswith("split")))
    print("classes", np.bincount(model.part_class, minlength=5).tolist())
"""


def test_split_within_classes_is_the_same_on_one_and_two_ranks(tmp_path):
    """The split within classes (engine/subsplit.py: each cut's coordinates, the
    held-out test of the cut) sums over the ranks' particles: its figures and its
    decision are the same on one and two ranks."""
    import re
    sys.path.insert(0, os.path.dirname(__file__))
    from test_subsplit import N, SNR, STATES, SWING
    data = tmp_path / "data"
    simulate_dataset(str(data), n=N, box=48, apix=5.0, snr=SNR, n_classes=4, seed=1,
                     shape="complex", states=[s for s, _ in STATES],
                     class_fractions=[f for _, f in STATES], swing_deg=SWING)
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SCRIPT.format(tests=os.path.dirname(__file__)))
    out = {}
    for n in (1, 2):
        proc = subprocess.run([MPIRUN, "--oversubscribe", "-np", str(n), sys.executable,
                               str(script), str(data)], env=mpi_env(), capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[n] = [line for line in proc.stdout.splitlines()
                  if line.startswith(("split", "classes"))]
    cuts = [line for line in out[1] if line.startswith("split within class ")]
    assert len(cuts) >= 3 and any(line.startswith("split: ") for line in out[1]), out[1]
    assert [line.split(":")[0] for line in out[1]] == [line.split(":")[0] for line in out[2]]
    numbers = [[float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)] for line in out[1]
               if not line.startswith("split within classes")]
    numbers2 = [[float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)] for line in out[2]
                if not line.startswith("split within classes")]
    assert all(len(a) == len(b) and np.allclose(a, b, atol=0.011)
               for a, b in zip(numbers, numbers2)), (out[1], out[2])
    assert out[1][-1] == out[2][-1]                  # the same particles moved


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
