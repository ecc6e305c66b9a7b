"""The output folder's guard (engine/run_guard.py): refusals, the lock, leftovers."""
import os
import signal
import subprocess
import sys

import pytest

from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine import run_guard


def _fake_run(root, last=3):
    for it in range(last + 1):
        for kind in ("optimiser.star", "state.npz", "data.star", "model.star", "class001.mrc"):
            open(f"{root}_it{it:03d}_{kind}", "w").close()
    open(f"{root}.log", "w").close()


def test_new_run_into_an_old_one_is_refused_then_replaced_with_overwrite(tmp_path):
    root = str(tmp_path / "run")
    _fake_run(root)
    with pytest.raises(CryoClassError, match=r"holds another run.*--continue .*run_it003_optimiser\.star"):
        run_guard.check_output_root(root)
    run_guard.check_output_root(root, continuing=True)          # continuing is fine
    run_guard.check_output_root(root, overwrite=True)
    assert run_guard.run_files(root) == [] and not os.path.exists(f"{root}.log")
    other = tmp_path / "run2_it001_data.star"       # another rootname is left alone
    other.write_text("x")
    run_guard.check_output_root(root)
    assert other.exists()


def test_a_run_never_overwrites_its_input(tmp_path):
    root = str(tmp_path / "run")
    _fake_run(root)
    with pytest.raises(CryoClassError, match="overwrite its own input"):
        run_guard.check_output_root(root, inputs=[f"{root}_it001_data.star"], overwrite=True)
    assert os.path.exists(f"{root}_it001_data.star")


@pytest.mark.parametrize("bad, message", [("out/", "not a folder"), ("", "rootname")])
def test_odd_output_names(tmp_path, bad, message):
    with pytest.raises(CryoClassError, match=message):
        run_guard.check_output_root(str(tmp_path / bad) + ("/" if bad else "") if bad else bad)


def test_parent_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CryoClassError, match="is a file, not a folder"):
        run_guard.check_output_root(str(tmp_path / "file" / "run"))
    with pytest.raises(CryoClassError, match="cannot (write|create)"):
        run_guard.check_output_root("/proc/cryoclass_test/run")
    if os.geteuid() != 0:          # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CryoClassError, match="cannot write"):
            run_guard.check_output_root(str(ro / "run"))


def test_lock_refuses_a_second_run_and_takes_over_a_dead_one(tmp_path):
    root = str(tmp_path / "run")
    with run_guard.OutputLock(root):
        with pytest.raises(CryoClassError, match="another run is writing there"):
            run_guard.OutputLock(root).acquire()
    assert not os.path.exists(f"{root}.lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    with open(f"{root}.lock", "w") as fh:
        fh.write(f"{socket.gethostname()} {dead.pid}\n")
    with run_guard.OutputLock(root):
        pass


def test_temporaries_of_this_run_are_removed(tmp_path):
    root = str(tmp_path / "run")
    names = [".run_it002_data.star.tmp123", ".run_it002_class001.mrc.tmp9",
             "run_it002_state.npz.tmp77.npz", ".other_it001_data.star.tmp5", "run_it002_data.star"]
    for n in names:
        (tmp_path / n).write_text("x")
    removed = sorted(os.path.basename(p) for p in run_guard.remove_temporaries(root))
    assert removed == sorted(names[:3])
    assert (tmp_path / names[3]).exists() and (tmp_path / names[4]).exists()


def test_sigterm_becomes_an_interrupt_naming_the_last_iteration(tmp_path):
    root = str(tmp_path / "run")
    _fake_run(root, last=2)
    os.remove(f"{root}_it002_state.npz")           # iteration 2 incomplete
    with pytest.raises(KeyboardInterrupt):
        with run_guard.termination_signals():
            os.kill(os.getpid(), signal.SIGTERM)
    line = run_guard.interrupted_line(root, "terminated")
    assert "last complete iteration is 1" in line and "run_it001_optimiser.star" in line
    assert signal.getsignal(signal.SIGTERM) is not run_guard._raise_interrupt


def test_os_error_lines_name_path_and_fix():
    import errno
    line = run_guard.os_error_line(OSError(errno.ENOSPC, "No space left on device"), "/x/run",
                                   "write")
    assert line == "/x/run: cannot write: no space left on the device; free space there or give another --o"


# ---------------------------------------------------------------- through the command line

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cryoclass_plugin.engine.simulate import simulate_dataset
    data = tmp_path_factory.mktemp("tiny")
    simulate_dataset(str(data), n=24, box=24, apix=8.0, snr=1.0, n_classes=1, seed=0)
    return data


def _refine(data, root, *extra):
    from cryoclass_plugin import cli
    return cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(root), "--iter", "1",
                     "--healpix_order", "0", "--offset_range", "0", "--j", "1"] + list(extra))


def test_cli_refuses_a_second_run_into_the_same_output(tiny, tmp_path, capsys):
    root = tmp_path / "out" / "run"
    assert _refine(tiny, root) == 0
    first = (tmp_path / "out" / "run_it001_data.star").read_bytes()
    assert _refine(tiny, root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "out" / "run_it001_data.star").read_bytes() == first
    with run_guard.OutputLock(str(root)):                      # a concurrent run
        assert _refine(tiny, root, "--overwrite") == 2
    assert "another run is writing there" in capsys.readouterr().err
    assert _refine(tiny, root, "--overwrite") == 0
    assert not os.path.exists(f"{root}.lock")
    log = open(f"{root}.log").read()
    assert log.count("cryoclass refine:") == 1                   # the old log went too


def test_cli_refuses_to_overwrite_its_input(tiny, tmp_path, capsys):
    root = tmp_path / "run"
    assert _refine(tiny, root) == 0
    from cryoclass_plugin import cli
    argv = ["refine", "--i", f"{root}_it001_data.star", "--ref", str(tiny / "ref.mrc"),
            "--o", str(root), "--overwrite", "--iter", "1", "--healpix_order", "0",
            "--offset_range", "0"]
    assert cli.main(argv) == 2
    assert "overwrite its own input" in capsys.readouterr().err


def test_sigterm_ends_the_run_with_a_message_and_continue_works(tiny, tmp_path):
    import time
    root = tmp_path / "run"
    argv = [sys.executable, "-m", "cryoclass_plugin.engine", "refine", "--i",
            str(tiny / "particles.star"), "--ref", str(tiny / "ref.mrc"), "--o", str(root),
            "--iter", "200", "--healpix_order", "1", "--offset_range", "0", "--j", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while run_guard.last_complete_iteration(str(root)) in (None, 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "terminated (SIGTERM)" in err and "--continue" in err and "Traceback" not in err
    last = run_guard.last_complete_iteration(str(root))
    assert f"last complete iteration is {last}" in open(f"{root}.log").read()
    assert not os.path.exists(f"{root}.lock")
    from cryoclass_plugin import cli
    assert cli.main(["refine", "--continue", f"{root}_it{last:03d}_optimiser.star",
                     "--iter", str(last + 1)]) == 0


def test_an_output_data_star_is_the_next_runs_input(tiny, tmp_path, monkeypatch):
    """Run in a working directory that is neither the data's folder nor the output's;
    the next run reads the first run's data.star from there (paths as RELION writes
    them: relative to the working directory)."""
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _refine(tiny, "Class3D/job001/run") == 0
    star = "Class3D/job001/run_it001_data.star"
    names = open(star).read()
    assert os.path.relpath(str(tiny / "particles.mrcs")) in names
    from cryoclass_plugin import cli
    assert cli.main(["refine", "--i", star, "--ref", str(tiny / "ref.mrc"), "--o",
                     "Class3D/job002/run", "--iter", "1", "--healpix_order", "0",
                     "--offset_range", "0", "--j", "1"]) == 0
    assert os.path.exists("Class3D/job002/run_it001_data.star")
