"""``cryoclass star-printtable FILE TABLE COLUMN...``: print columns of a STAR table.

Like ``relion_star_printtable``: the values of the given columns, whitespace-separated,
one row per line, exactly as written in the file.  ``TABLE`` is a block name such as
``data_model_class_1``, ``data_particles`` or ``data_model_general`` (a key/value block
prints one line); ``data_`` alone is the unnamed block of a RELION 3.0 file.  Column
names may be given with or without the leading underscore (``rlnClassNumber`` or
``_rlnClassNumber``).  Without columns, all columns are printed.

Examples::

    cryoclass star-printtable out/run_it025_model.star data_model_class_1 \\
        rlnResolution rlnSsnrMap
    cryoclass star-printtable out/run_it025_data.star data_particles rlnClassNumber \\
        | sort | uniq -c
"""
import sys

from ..engine.errors import CryoClassError


def add_args(parser):
    parser.add_argument("file", metavar="FILE", help="STAR file")
    parser.add_argument("table", metavar="TABLE",
                        help="table (block) name, e.g. data_particles, data_model_class_1")
    parser.add_argument("columns", metavar="COLUMN", nargs="*",
                        help="column labels, e.g. rlnClassNumber (default: all columns)")
    parser.add_argument("--header", action="store_true",
                        help="print the column labels as a first line, prefixed with '#'")


def column_label(name):
    """'_rlnX' / 'rlnX' -> 'rlnX'."""
    return str(name).strip().lstrip("_")


def table_rows(path, table, columns=None):
    """(labels, rows as lists of strings as written) of a STAR table's columns.

    One-line CryoClassError naming the file, table or column, listing what exists."""
    from ..runresults import block_key, read_star, read_star_block

    wanted = [column_label(c) for c in (columns or [])]
    # probe the labels first so the raw read keeps exactly the requested columns' text
    block = read_star_block(path, table)
    labels = list(block.keys()) if isinstance(block, dict) else list(block.columns)
    if not wanted:
        wanted = labels
    missing = [c for c in wanted if c not in labels]
    if missing:
        raise CryoClassError(
            f"{path}: table data_{block_key(table)} has no column "
            f"{', '.join(missing)}; columns: {', '.join(labels) or 'none'}")
    raw = read_star(path, raw_columns=wanted)[block_key(table)]
    if isinstance(raw, dict):
        return wanted, [[_text(raw[c]) for c in wanted]]
    return wanted, [[_text(v) for v in row]
                    for row in raw[wanted].itertuples(index=False, name=None)]


def _text(v):
    s = str(v)
    return f'"{s}"' if (not s or any(ch.isspace() for ch in s)) else s


def main(args):
    labels, rows = table_rows(args.file, args.table, args.columns)
    out = sys.stdout
    try:
        if args.header:
            out.write("# " + " ".join(labels) + "\n")
        for row in rows:
            out.write(" ".join(row) + "\n")
        out.flush()
    except BrokenPipeError:       # e.g. piped into head
        return 0
    return 0
