"""The option registry (:mod:`cryoclass_plugin.engine.options`) against the command line,
``Settings``, the automatic defaults and the ``--continue`` rules.  (The protocol's
argument builder is checked against it in test_protocols.py, which has a Scipion
project.)"""
import argparse
import dataclasses

import pytest

from cryoclass_plugin.commands import refine as refine_cmd
from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine.options import (CONTINUE_RULES, GROUPS, KINDS, OPTIONS,
                                             OPTIONS_BY_FIELD, OPTIONS_BY_FLAG, SAME, Settings,
                                             resolve_automatic)

PATHS = ["--i", "p.star", "--o", "out/run", "--ref", "r.mrc"]
#: CLI flags of how ``main`` runs, not options of the run (tested in this file and in
#: test_run_guard.py).
RUN_MODE = {"help", "dry_run", "overwrite"}
#: relion_refine flags that cryoclass refuses in one line.
REFUSED = set(refine_cmd.REFUSED) | set(refine_cmd.HELIX_FLAGS)
#: CLI flags that are not options of a run: the run modes, the refused flags and the
#: RELION flags that select what the engine always does.
NOT_OPTIONS = RUN_MODE | REFUSED | set(refine_cmd.ALWAYS_DOES)
HISTORY_WORDS = ("used to", "previously", "no longer", "session", "earlier version")


def _parser():
    parser = argparse.ArgumentParser()
    refine_cmd.add_args(parser)
    return parser


def _settings(*flags):
    return refine_cmd.settings_from_args(_parser().parse_args(PATHS + list(flags)))


def test_every_settings_field_has_one_option():
    names = [f.name for f in dataclasses.fields(Settings)]
    assert names == [opt.field for opt in OPTIONS]
    assert len(set(names)) == len(names)
    flags = [opt.flag for opt in OPTIONS if opt.flag]
    assert len(set(flags)) == len(flags)


def test_every_cli_flag_default_equals_the_settings_default():
    """Parsed without flags, every option has its Settings default; every flag of the
    parser is an option (or one of the named non-options)."""
    parser = _parser()
    args = parser.parse_args([])
    defaults = Settings()
    for opt in OPTIONS:
        if opt.flag:
            assert getattr(args, opt.field) == getattr(defaults, opt.field), opt.field
    flags = {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}
    options = {opt.flag for opt in OPTIONS if opt.flag} | {
        opt.off_flag for opt in OPTIONS if opt.off_flag}
    assert flags - options == NOT_OPTIONS - options
    assert Settings().n_iter == 50          # RELION's relion_refine default, both ways


def test_every_option_has_help_a_group_and_a_continue_rule():
    for opt in OPTIONS:
        assert len(opt.help) > 10, opt.field
        assert not any(w in opt.help.lower() for w in HISTORY_WORDS), opt.field
        assert opt.group in GROUPS and opt.on_continue in CONTINUE_RULES, opt.field
        assert opt.kind in KINDS and (opt.kind == "pair") == bool(opt.off_flag), opt.field
        assert opt.form_default is SAME or opt.param or opt.kind == "switch", opt.field
    help_text = _parser().format_help()
    for opt in OPTIONS:
        if opt.flag:
            assert "--" + opt.flag in help_text


@pytest.mark.parametrize("flags", [
    [], ["--K", "3"], ["--K", "3", "--init_classes", "pca"],
    ["--K", "4", "--init_classes", "consensus", "--merge_threshold", "0"],
    ["--K", "3", "--init_classes", "pca", "--tau2_estimate", "power"],
    ["--K", "3", "--init_classes", "pca", "--solvent_mask", "m.mrc"],
    ["--K", "2", "--init_classes", "pca", "--consensus_tau2_estimate", "power",
     "--class_difference_highres", "30", "--auto_mask_sigma", "2"],
])
def test_the_python_api_and_the_cli_resolve_the_same_defaults(flags):
    """The CLI's settings are the Python API's ``Settings(...).resolved()`` for the same
    values; nothing automatic is left unresolved."""
    args = _parser().parse_args(PATHS + flags)
    given = {opt.field: getattr(args, opt.field) for opt in OPTIONS if opt.flag}
    api = Settings(**given).resolved()
    cli = refine_cmd.settings_from_args(args)
    assert cli == api
    assert cli.tau2_estimate in ("power", "em") and cli.consensus_tau2_estimate
    assert cli.class_difference_highres >= 0 and cli.auto_mask_sigma >= 0
    assert resolve_automatic(cli) == cli                 # idempotent


def test_automatic_rules():
    pca = _settings("--K", "3", "--init_classes", "pca")
    assert (pca.tau2_estimate, pca.class_difference_highres, pca.auto_mask_sigma) == \
        ("em", 18.0, 3.0)
    relion = _settings("--K", "3")
    assert (relion.tau2_estimate, relion.class_difference_highres,
            relion.auto_mask_sigma) == ("power", 25.0, 0.0)
    assert _settings("--K", "3", "--init_classes", "pca",
                     "--solvent_mask", "m.mrc").auto_mask_sigma == 0.0
    assert _settings("--K", "3", "--init_classes", "pca",
                     "--tau2_estimate", "power").class_difference_highres == 25.0


def test_continue_rules_come_from_the_registry():
    changeable = {opt.field for opt in OPTIONS if opt.on_continue == "change"}
    assert refine_cmd.continue_changeable() == changeable
    assert {"n_iter", "output_root", "tau2_fudge", "threads"} <= changeable
    assert {"n_classes", "sym", "init_classes"}.isdisjoint(changeable)
    run = Settings(input_star="p.star", output_root="run", ref="r.mrc", n_classes=2,
                   tau2_fudge=4.0, n_iter=3).resolved()
    parser = _parser()

    def apply(*flags):
        settings = dataclasses.replace(run)
        args = parser.parse_args(["--continue", "run_it003_optimiser.star"] + list(flags))
        refine_cmd._apply_continue_flags(args, settings)
        return settings

    # 'change': takes effect, also when the value is the flag's default (T = 1)
    assert apply("--iter", "50", "--tau2_fudge", "1", "--j", "2").n_iter == 50
    assert apply("--tau2_fudge", "1").tau2_fudge == 1.0
    # 'run': the run's own paths, given again in any spelling, never changed
    assert apply("--i", "./p.star").input_star == "p.star"
    with pytest.raises(CryoClassError, match="--i elsewhere/p.star is not the run's p.star"):
        apply("--i", "elsewhere/p.star")
    # 'keep': the same value passes; another one is a one-line error naming the flag
    assert apply("--K", "2").n_classes == 2
    for flags, word in ((["--K", "1"], "--K 1 differs from the run's 2"),
                        (["--sym", "C2"], "--sym C2 differs"),
                        (["--mean_consensus"], "--joint_consensus False differs")):
        with pytest.raises(CryoClassError, match=word):
            apply(*flags)


def test_option_lookup_is_by_field():
    assert OPTIONS_BY_FIELD["n_classes"].flag == "K"
    assert OPTIONS_BY_FIELD["gridding"].kind == "pair"
    assert _settings("--skip_gridding").gridding is False
    assert _settings("--gpu").gpu == "" and _settings("--gpu", "0:1").gpu == "0:1"
    assert _settings().gpu is None


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    """``--dry_run``: the inputs are checked, the schedule printed (a header, then one
    line per iteration), nothing is written, exit 0."""
    from cryoclass_plugin import cli
    from cryoclass_plugin.engine.simulate import simulate_dataset
    data = tmp_path / "sim"
    simulate_dataset(str(data), n=24, box=16, apix=8.0, snr=1.0, n_classes=2, seed=1)
    out = tmp_path / "run" / "run"
    argv = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(out), "--K", "2", "--init_classes", "pca", "--iter", "12",
            "--consensus_iter", "3", "--dry_run"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 12, lines
    phases = [line.split()[2] for line in lines[1:]]
    assert phases[0] == "consensus" and "split" in phases and phases[-1] == "em", phases
    assert not (tmp_path / "run").exists()
    assert cli.main(argv[:-1] + ["--K", "0", "--dry_run"]) == 2      # inputs checked


@pytest.mark.parametrize("flags, message", [
    (["--particle_diameter", "-50"], "--particle_diameter -50: give a mask diameter"),
    (["--ini_high", "-10"], "--ini_high -10: give a resolution"),
    (["--strict_highres_exp", "0"], "--strict_highres_exp 0"),
    (["--healpix_order", "9"], "--healpix_order 9: give 0"),
    (["--oversampling", "5"], "--oversampling 5"),
    (["--offset_range", "-1"], "--offset_range -1"),
    (["--offset_step", "0"], "--offset_step 0"),
    (["--j", "0"], "--j 0"),
    (["--block_size", "0"], "--block_size 0"),
    (["--adaptive_fraction", "1.5"], "--adaptive_fraction 1.5"),
    (["--maxsig", "0"], "--maxsig 0"),
    (["--merge_retest_iter", "-1"], "--merge_retest_iter -1: give 0 or more"),
    (["--classify_final_iter", "-2"], "--classify_final_iter -2: give 0 or more"),
    (["--classify_final_sigma", "0"], "--classify_final_sigma 0: give a prior width"),
    (["--merge_min_agreement", "0.3"], "--merge_min_agreement 0.3: give a share from 0.5 to"),
    (["--merge_max_agreement", "1.2"], "--merge_max_agreement 1.2: give a share from 0.5 to 1"),
])
def test_numeric_flags_out_of_range_are_refused(flags, message):
    with pytest.raises(CryoClassError, match=message.replace("(", r"\(")):
        _settings(*flags)
    _settings()           # the defaults pass


#: A valid value unlike the default, where "default + 1" (int) or "twice the default, or
#: 10 when unset" (float) would not be one.
SAMPLES = {"classify_local_order": 3, "adaptive_fraction": 0.9, "max_significant": 100,
           "merge_min_agreement": 0.8, "merge_max_agreement": 0.95,
           "sym": "C2", "input_star": "q.star", "output_root": "out/other", "ref": "s.mrc"}


def _sample(opt):
    if opt.field in SAMPLES:
        return SAMPLES[opt.field]
    if opt.choices:
        return next(c for c in reversed(opt.choices) if c != opt.default)
    if opt.type is int:
        return opt.default + 1
    if opt.type is float:
        return opt.default * 2 if opt.default > 0 else 10.0
    return "x.mrc"


def test_every_cli_flag_changes_the_settings_or_is_refused_or_documented():
    """Walk every flag of ``cryoclass refine``: an option's flag changes the run's
    Settings (a pair: its two flags differ), a refused flag stops the run in one line
    that says why, a flag that selects what the engine always does leaves the Settings
    as they are and its help says so; nothing else exists."""
    from cryoclass_plugin.engine.errors import NotImplementedOption
    parser = _parser()
    base = _settings()
    seen = set()
    for action in parser._actions:
        for option in (o for o in action.option_strings if o.startswith("--")):
            name = option[2:]
            seen.add(name)
            if name in RUN_MODE:
                continue
            if name in refine_cmd.ALWAYS_DOES:
                assert _settings(option) == base and action.help.startswith("accepted")
            elif name in REFUSED:
                value = [] if action.nargs == 0 else ["2"]
                named = "--helix" if name in refine_cmd.HELIX_FLAGS else option
                with pytest.raises(NotImplementedOption, match=f"^{named}: .*; run without"):
                    _settings(option, *value)
            elif name in OPTIONS_BY_FLAG and OPTIONS_BY_FLAG[name].kind == "pair":
                opt = OPTIONS_BY_FLAG[name]
                assert _settings(option) != _settings("--" + opt.off_flag), name
            elif name in OPTIONS_BY_FLAG and name != "continue":   # --continue: below
                opt = OPTIONS_BY_FLAG[name]
                value = [] if action.nargs == 0 else [str(_sample(opt))]
                assert _settings(option, *value) != base, name
            else:
                assert name == "continue" or any(
                    o.off_flag == name for o in OPTIONS), f"{option}: not walked"
    assert "continue" in seen and not (NOT_OPTIONS - seen)


def test_readme_flag_table_lists_every_flag():
    """README's "Flags" section names every flag of the parser (same, differs, ours or
    refused)."""
    import re
    from pathlib import Path
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Flags", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"--([A-Za-z_0-9]+)", section))
    parser = _parser()
    flags = {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert flags - {"help"} <= listed, sorted(flags - {"help"} - listed)
