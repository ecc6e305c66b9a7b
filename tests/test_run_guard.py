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
