"""``cryoclass star-plottable FILE... TABLE XCOLUMN YCOLUMN... [-o plot.png]``.

Plots columns of a STAR table from one or several files into one PNG: one line per
file and Y column, labelled with the file name (``run_it025_model``) when there are
several files.  The files come first (a shell glob such as ``out/run_it*_model.star``,
or a quoted glob that is expanded here, in natural order), then the table
(``data_...``), then the X column and the Y columns.  ``XCOLUMN`` ``-`` plots against
the row number.  With ``rlnResolution`` on X a top axis shows Angstrom.

Example::

    cryoclass star-plottable out/run_it*_model.star data_model_class_1 \\
        rlnResolution rlnSsnrMap --logy -o ssnr.png
"""
import glob
import os
import re

import numpy as np

from ..engine.errors import CryoClassError


def add_args(parser):
    parser.add_argument("items", metavar="FILE... TABLE XCOLUMN YCOLUMN", nargs="+",
                        help="STAR files, then the table (data_...), the X column "
                             "('-' for the row number) and one or more Y columns")
    parser.add_argument("-o", "--output", default="star_plottable.png",
                        help="output image (PNG; default %(default)s)")
    parser.add_argument("--logy", action="store_true", help="logarithmic Y axis")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--dpi", type=int, default=110)


def _natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def split_items(items):
    """(files, table, xcolumn, ycolumns) from the positional arguments."""
    idx = next((i for i, a in enumerate(items) if a.startswith("data_")), None)
    if idx is None:
        # no data_ prefix: the table is the first item that is not a file or glob
        idx = next((i for i, a in enumerate(items)
                    if not os.path.exists(a) and not glob.has_magic(a)), None)
    if idx is None or idx == 0:
        raise CryoClassError("usage: star-plottable FILE... TABLE XCOLUMN YCOLUMN... "
                             "(give at least one STAR file before the table)")
    rest = items[idx + 1:]
    if len(rest) < 2:
        raise CryoClassError(f"give an X column and at least one Y column after "
                             f"{items[idx]} (X '-' for the row number)")
    files = []
    for a in items[:idx]:
        if glob.has_magic(a) and not os.path.exists(a):
            hits = sorted(glob.glob(a), key=_natural_key)
            if not hits:
                raise CryoClassError(f"{a}: no files match")
            files.extend(hits)
        else:
            files.append(a)
    return files, items[idx], rest[0], rest[1:]


def _numeric(values, path, table, col):
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise CryoClassError(f"{path}: column {col} of {table} is not numeric") from None


def build_figure(files, table, xcol, ycols, logy=False, title=None):
    from ..figures import _angstrom_top_axis, _figure
    from ..runresults import as_frame, block_key, read_star_block
    from .star_printtable import column_label

    xcol = xcol if xcol == "-" else column_label(xcol)
    ycols = [column_label(c) for c in ycols]
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    cmap_n = len(files) * len(ycols)
    from matplotlib import colormaps
    cmap = colormaps["viridis" if cmap_n > 10 else "tab10"]
    n = 0
    for path in files:
        df = as_frame(read_star_block(path, table))
        for col in [c for c in [xcol] + ycols if c != "-"]:
            if col not in df:
                raise CryoClassError(
                    f"{path}: table data_{block_key(table)} has no column {col}; "
                    f"columns: {', '.join(map(str, df.columns)) or 'none'}")
        x = np.arange(1, len(df) + 1, dtype=float) if xcol == "-" else \
            _numeric(df[xcol], path, table, xcol)
        for col in ycols:
            y = _numeric(df[col], path, table, col)
            if logy:
                y = np.where(y > 0, y, np.nan)
            name = os.path.basename(path)
            name = name[:-5] if name.endswith(".star") else name
            lab = name if len(ycols) == 1 else (col if len(files) == 1 else f"{name} {col}")
            color = cmap(n / max(cmap_n - 1, 1)) if cmap_n > 10 else cmap(n % 10)
            ax.plot(x, y, "-" if len(x) > 1 else "o", lw=1.4, ms=3, color=color, label=lab)
            n += 1
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("row" if xcol == "-" else xcol, fontsize=9)
    ax.set_ylabel(ycols[0] if len(ycols) == 1 else ", ".join(ycols), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if xcol == "rlnResolution":
        ax.set_xlim(left=0)
        _angstrom_top_axis(ax, ax.get_xlim()[1])
    if n > 1:
        ax.legend(fontsize=7, ncol=2 if n > 12 else 1, loc="best")
    fig.suptitle(title or f"{', '.join(ycols)} of data_{block_key(table)}", fontsize=10)
    return fig


def main(args):
    from ..figures import save_figure

    files, table, xcol, ycols = split_items(args.items)
    fig = build_figure(files, table, xcol, ycols, logy=args.logy, title=args.title)
    save_figure(fig, args.output, dpi=args.dpi)
    print(args.output)
    return 0
