"""The ``cryoclass`` command: a dispatcher over small command modules.

Each command lives in ``cryoclass_plugin/commands/<name>.py`` with ``add_args(parser)``
and ``main(args)`` (the cryoDRGN layout).  Modules are imported only when their command
runs, so ``cryoclass --help`` stays fast and the engine never needs pyworkflow.
"""
import argparse
import importlib
import sys

from .engine.errors import CryoClassError, RunInterrupted
from .heap import retain_freed_memory

# command name -> (module under cryoclass_plugin.commands, one-line help)
COMMANDS = {
    "simulate": ("simulate", "simulate a heterogeneous particle data set with ground truth"),
    "refine": ("refine", "run 3D classification (RELION Class3D flags)"),
    "demo": ("demo", "run the whole user path on built-in data in a headless Scipion project"),
    "report": ("report", "write figures (slices, SSNR, convergence) for an engine output"),
    "star-printtable": ("star_printtable", "print columns of a STAR table"),
    "star-plottable": ("star_plottable", "plot columns of STAR tables to a PNG"),
    "train-blush": ("train_blush", "train the Blush denoising network on synthetic maps"),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cryoclass",
        description="cryoclass: RELION-style unsupervised 3D classification of cryo-EM "
                    "particles (engine of the cryoclass Scipion plugin).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"cryoclass: error: unknown command '{argv[0]}'; choose from "
                  f"{', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    retain_freed_memory()   # before numpy starts its threads: see cryoclass_plugin.heap
    module = importlib.import_module(f"cryoclass_plugin.commands.{COMMANDS[name][0]}")
    sub = argparse.ArgumentParser(prog=f"cryoclass {name}", description=COMMANDS[name][1])
    module.add_args(sub)
    args = sub.parse_args(rest)
    try:
        result = module.main(args)
    except RunInterrupted as err:
        print(f"cryoclass {name}: {err}", file=sys.stderr)
        return err.exit_code
    except CryoClassError as err:
        print(f"cryoclass {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoclass {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
