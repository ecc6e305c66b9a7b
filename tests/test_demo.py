"""``cryoclass demo``: the whole user path (simulate, Scipion project, import, 3D
classification, selection, report, comparison with the truth) as a user runs it, on a
tiny data set: a smoke test of the plumbing, not of the classification quality."""
import json
import os
import shutil
import subprocess
import sys

import pytest


def _cryoclass():
    exe = os.path.join(os.path.dirname(sys.executable), "cryoclass")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "cryoclass_plugin.cli"]


def _env():
    """The user's environment: without the test session's headless Scipion variables
    (the demo sets up its own Scipion under --out)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SCIPION_") and k != "CRYOCLASS_HEADLESS_SCIPION"}


def _demo(args, timeout):
    return subprocess.run(_cryoclass() + ["demo"] + args, capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def test_demo_refuses_bad_options_clearly(tmp_path):
    for args, message in ((["--box", "33"], "--box 33: use an even box"),
                          (["--particles", "5"], "--particles 5: use at least 10"),
                          (["--iter", "0"], "--iter 0: must be at least 1")):
        res = _demo(args + ["--out", str(tmp_path / "d")], timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "cryoclass demo: error: " + message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    """The demo end to end on 150 particles, 2 iterations (a Scipion project, six steps,
    the report): about 30 s on 2 cores, so ``slow``."""
    out = tmp_path / "demo"
    res = _demo(["--out", str(out), "--particles", "150", "--iter", "2", "--box", "32"],
                timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    for step in range(1, 7):
        assert "[%d/6]" % step in res.stdout, log[-6000:]
    assert "engine | iter   2" in res.stdout          # the engine's log was streamed
    report = out / "report" / "index.html"
    assert report.exists() and (out / "report" / "central_slices.png").exists()
    assert str(report) in res.stdout
    # the class table, against the truth
    assert "Classes at iteration 2" in res.stdout
    assert "true class" in res.stdout and "purity" in res.stdout
    assert "ARI" in res.stdout and "oracle accuracy" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["classes"]) == 3
    assert sum(r["particles"] for r in summary["classes"]) == 150
    assert summary["classified_particles"] == 150
    assert summary["selected_classes"]
    assert -1.0 <= summary["ari"] <= 1.0 and 0 < summary["oracle_accuracy"] <= 1
    assert (out / "classes.tsv").read_text().startswith("class\tparticles")
    project = summary["paths"]["project"]
    assert os.path.exists(os.path.join(project, "project.sqlite"))
    assert os.path.exists(os.path.join(summary["paths"]["engine_outputs"],
                                       "cryoclass_it002_model.star"))
    shutil.rmtree(out, ignore_errors=True)
