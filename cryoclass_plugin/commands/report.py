"""``cryoclass report RUNROOT [-o DIR] [--iter N]``: figures of a run as PNGs plus a
one-page ``index.html``.

``RUNROOT`` is the run's rootname (``out/run``), its folder (``out``) or one of its
files.  Works on finished and running outputs: by default the last iteration that has
a ``model.star``; ``--iter N`` picks another.  Writes into ``DIR`` (default
``<RUNROOT>_report``)::

    central_slices.png          central slices of all classes, largest first
    slices_classKKK.png         slices along z of each class map
    ssnr.png                    SSNR per class
    class_distribution.png      class distribution over iterations
    class_resolution.png        estimated resolution per class over iterations
    convergence.png             changes in classes / orientations / offsets, ...
    angular_distribution.png    projection directions per class (needs data.star)
    angdist_itNNN_classKKK.bild the same as ChimeraX markers (one sphere per sampled
                                direction, radius ~ particles), with a .cxc opening
                                the class map and its markers
    classes.cxc                 ChimeraX script: open, fit into the largest class, tile
    index.html                  everything above on one page

``--overlay-iters LIST`` (e.g. ``5,10-15``) overlays the SSNR curves of those iterations
and limits the plots over iterations to them.

The ``figure_*`` functions build each figure from a :class:`RunResults` and are what the
Scipion viewer uses, so the report and the viewer always show the same thing.
"""
import datetime
import html
import os

import numpy as np

from ..engine.errors import CryoClassError


def add_args(parser):
    parser.add_argument("run", metavar="RUNROOT",
                        help="run rootname (out/run), its folder, or one of its files")
    parser.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="output folder (default: <RUNROOT>_report)")
    parser.add_argument("--iter", type=int, default=None, metavar="N",
                        help="iteration to show (default: the last one written)")
    parser.add_argument("--classes", default=None, metavar="LIST",
                        help="classes to show, e.g. '1,3-4' (default: all)")
    parser.add_argument("--overlay-iters", default=None, metavar="LIST",
                        help="iterations whose SSNR curves are overlaid and which the "
                             "plots over iterations show, e.g. 5,10-15 (default: the "
                             "shown iteration's SSNR; all iterations)")
    parser.add_argument("--slices-axis", default="z", choices=["z", "y", "x"],
                        help="axis of the per-class slice grids (default z)")
    parser.add_argument("--angdist", default="mollweide", choices=["mollweide", "rect"],
                        help="angular distribution plot style (default mollweide)")
    parser.add_argument("--dpi", type=int, default=110)


def parse_classes(text, flag="--classes"):
    """'1,3-4' -> [1, 3, 4]; None/'' -> None."""
    if text is None or str(text).strip() in ("", "all"):
        return None
    out = []
    for part in str(text).replace(" ", ",").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise CryoClassError(f"{flag}: cannot read '{text}' "
                                 f"(expected a list like 1,3-4)") from None
    return sorted(set(out))


# ---------------------------------------------------------------------------------------
# one function per figure, from a RunResults
# ---------------------------------------------------------------------------------------
def _classes_of(run, it, classes):
    ks = run.model(it).class_numbers()
    if classes:
        bad = [k for k in classes if k not in ks]
        if bad:
            raise CryoClassError(f"{run.root}: no class {', '.join(map(str, bad))} at "
                                 f"iteration {it} (classes {ks[0]}-{ks[-1]})")
        ks = [k for k in ks if k in classes]
    return ks


def figure_map_slices(run, it, k, axis="z"):
    from ..figures import map_slices_figure

    vol, apix = run.class_map(it, k)
    return map_slices_figure(vol, apix, axis=axis, title=f"Class {k}, iteration {it}")


def figure_central_slices(run, it, classes=None, mode="slice"):
    from ..figures import central_slices_figure

    maps, apix = run.class_maps(it, _classes_of(run, it, classes))
    if not maps:
        raise CryoClassError(f"{run.root}: no class maps at iteration {it}")
    return central_slices_figure(maps, run.summary(it), apix, mode=mode,
                                 title=f"Iteration {it}")


def figure_ssnr(run, it, classes=None, iterations=None):
    """SSNR per class of iteration ``it``; with ``iterations`` (several), the curves of
    all of them overlaid, one line per (iteration, class)."""
    from ..figures import ssnr_figure, ssnr_overlay_figure

    its = run.resolve_iterations(iterations) if iterations else [run.resolve_iteration(it)]
    per_it = {}
    for i in its:
        model = run.model(i)
        ks = _classes_of(run, i, classes)
        per_it[i] = ({k: t for k, t in model.class_tables().items() if k in ks},
                     model.classes)
    if len(its) == 1:
        return ssnr_figure(*per_it[its[0]], title=f"SSNR per class, iteration {its[0]}")
    return ssnr_overlay_figure(per_it, title="SSNR per class, iterations "
                                             f"{_iter_text(its)}")


def _iter_text(its):
    from ..runresults import _ranges
    return _ranges(list(its))


def figure_class_distribution(run, classes=None, iterations=None):
    from ..figures import class_distribution_figure

    df = run.class_distribution_series(iterations)
    if classes:
        df = df[[k for k in df.columns if k in classes]]
    return class_distribution_figure(df)


def figure_class_resolution(run, classes=None, iterations=None):
    from ..figures import class_resolution_figure

    df = run.class_resolution_series(iterations)
    if classes:
        df = df[[k for k in df.columns if k in classes]]
    conv = run.convergence_series(iterations)
    return class_resolution_figure(df, current=conv.get("rlnCurrentResolution"))


def figure_convergence(run, iterations=None):
    from ..figures import convergence_figure

    return convergence_figure(run.convergence_series(iterations),
                              title=f"Convergence ({run.name})")


def figure_angular_distribution(run, it, classes=None, projection="mollweide"):
    from ..figures import angular_distribution_figure

    if not run.has(it, "data"):
        raise CryoClassError(f"{run.path(it, 'data')}: missing (no particle angles for "
                             f"iteration {it})")
    ks = _classes_of(run, it, classes)
    data = run.data(it)
    if "rlnClassNumber" in data:
        present = set(data["rlnClassNumber"].astype(int))
        # asked-for classes are all shown (an empty one says "0 particles"); by default
        # only those with particles, largest first
        order = [k for k in run.summary(it)["class"] if k in ks and (classes or k in present)]
    else:
        order = None
    return angular_distribution_figure(
        data, classes=order, class_info=run.model(it).classes, projection=projection,
        title=f"Angular distribution, iteration {it}")


# HEALPix order of the BILD markers: the run's sampling, at most this (order 4: 3072
# directions, 3.75 degrees apart), so that a fine run still gives readable markers.
BILD_MAX_ORDER = 4


def angdist_bild(run, it, out_dir, classes=None, max_order=BILD_MAX_ORDER):
    """Angular distribution of each class of iteration ``it`` as ChimeraX markers.

    Per class ``angdist_itNNN_classKKK.bild`` (one sphere per sampled direction that
    holds particles, radius proportional to their number; the directions are the HEALPix
    pixel centres of the run's ``rlnHealpixOrder``, at most ``max_order``) and
    ``angdist_itNNN_classKKK.cxc`` opening the class map with its markers around it.
    Returns ``{class: {'bild', 'cxc', 'markers', 'particles', 'order'}}``.
    """
    from ..engine import healpix
    from ..figures import class_color, direction_counts, write_angdist_bild

    it = run.resolve_iteration(it)
    if not run.has(it, "data"):
        raise CryoClassError(f"{run.path(it, 'data')}: missing (no particle angles for "
                             f"iteration {it})")
    data = run.data(it)
    for lab in ("rlnAngleRot", "rlnAngleTilt", "rlnClassNumber"):
        if lab not in data:
            raise CryoClassError(f"{run.path(it, 'data')}: no {lab} column")
    order = BILD_MAX_ORDER
    if run.has(it, "sampling"):
        order = int(run.sampling(it).get("rlnHealpixOrder", max_order))
    order = max(0, min(order, max_order))
    directions = healpix.pix2vec(np.arange(healpix.npix(order)), order)
    model = run.model(it)
    apix, box = model.pixel_size or 1.0, model.box or 64
    centre = np.full(3, (box // 2) * apix)          # RELION's centre voxel, in A
    distance, max_radius = 0.75 * box * apix / 2, 0.05 * box * apix
    cls = data["rlnClassNumber"].astype(int).to_numpy()
    out = {}
    for k in _classes_of(run, it, classes):
        sel = cls == k
        counts = direction_counts(data["rlnAngleRot"].to_numpy(float)[sel],
                                  data["rlnAngleTilt"].to_numpy(float)[sel], directions)
        stem = os.path.join(out_dir, f"angdist_it{it:03d}_class{k:03d}")
        note = (f"class {k} iteration {it}: {int(sel.sum())} particles on "
                f"{int((counts > 0).sum())} of {len(directions)} directions (HEALPix order "
                f"{order}); largest marker {max_radius:.3f} A = {int(counts.max())} particles")
        markers = write_angdist_bild(stem + ".bild", directions, counts, centre, distance,
                                     max_radius, color=class_color(k), comment=note)
        out[k] = {"bild": stem + ".bild", "cxc": _angdist_cxc(run, it, k, stem, apix),
                  "markers": markers, "particles": int(sel.sum()), "order": order}
    return out


def _angdist_cxc(run, it, k, stem, apix):
    """ChimeraX script: class k's map as a surface and its angular-distribution markers."""
    from ..figures import write_chimerax_script

    cxc = stem + ".cxc"
    map_path = run.class_map_path(it, k)
    if os.path.exists(map_path):
        write_chimerax_script([map_path], cxc, apix, labels=[f"class {k}"], fit=False,
                              tile=False)
        with open(cxc) as f:
            lines = f.read().splitlines()
    else:
        lines = ["# ChimeraX script written by cryoclass", "set bgColor white"]
    lines[0] = (f"# ChimeraX script written by cryoclass: class {k} of iteration {it} and "
                "its angular distribution (one sphere per direction, radius ~ particles)")
    bild = os.path.abspath(stem + ".bild")
    lines.insert(len(lines) - 1 if lines[-1] == "view" else len(lines),
                 f'open "{bild}"' if " " in bild else f"open {bild}")
    if lines[-1] != "view":
        lines.append("view")
    with open(cxc, "w") as f:
        f.write("\n".join(lines) + "\n")
    return cxc


def chimerax_script(run, it, out_cxc, classes=None):
    """ChimeraX script for the classes of an iteration, largest class first (#1)."""
    from ..figures import write_chimerax_script

    ks = _classes_of(run, it, classes)
    summ = run.summary(it)
    order = [k for k in summ["class"] if k in ks]
    paths = [run.class_map_path(it, k) for k in order]
    keep = [(k, p) for k, p in zip(order, paths) if os.path.exists(p)]
    if not keep:
        raise CryoClassError(f"{run.root}: no class maps at iteration {it}")
    apix = run.model(it).pixel_size
    labels = []
    for k, _ in keep:
        row = summ[summ["class"] == k].iloc[0]
        d = row.get("rlnClassDistribution")
        labels.append(f"class {k}" + (f" {100 * d:.1f}%" if d == d and d is not None else ""))
    return write_chimerax_script([p for _, p in keep], out_cxc, apix, labels=labels)


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------
_CAPTIONS = {
    "central_slices": "Central slices (xy, xz, yz) of every class, sorted by class "
                      "distribution, labelled with distribution and estimated resolution.",
    "ssnr": "Spectral SNR per class (rlnSsnrMap) against resolution; the dashed line "
            "is SSNR = 1, dotted lines mark each class's estimated resolution.",
    "class_distribution": "Fraction of particles per class (rlnClassDistribution) "
                          "over iterations.",
    "class_resolution": "Estimated resolution per class (rlnEstimatedResolution) over "
                        "iterations, with the resolution the run was working at.",
    "convergence": "Changes in optimal classes, orientations and offsets between "
                   "iterations (optimiser.star), log-likelihood, average Pmax and "
                   "current resolution (model.star).",
    "angular_distribution": "Projection directions (rot, tilt) of the particles in each "
                            "class; equal-area bins, grey bins have no particles.",
    "slices": "Slices along {axis} of class {k} (one greyscale per map).",
}


def write_report(run_root, out_dir=None, iteration=None, classes=None, slices_axis="z",
                 angdist="mollweide", dpi=110, overlay_iterations=None):
    """Write the PNGs, the ChimeraX scripts and markers and index.html; returns
    ``{'index': path, 'figures': {name: path}, 'chimerax': path, 'bild': {class:
    path}, 'notes': [...], 'iteration': it}``.  ``overlay_iterations``: iterations whose
    SSNR curves are overlaid and which the plots over iterations show."""
    from ..figures import save_figure
    from ..runresults import RunResults

    run = RunResults(run_root)
    it = run.resolve_iteration(iteration)
    classes = list(classes) if classes else None
    ks = _classes_of(run, it, classes)
    over = run.resolve_iterations(overlay_iterations) if overlay_iterations else None
    out_dir = out_dir or (run.root + "_report")
    os.makedirs(out_dir, exist_ok=True)

    figures, notes = {}, []

    def attempt(name, build):
        try:
            fig = build()
        except CryoClassError as err:
            notes.append(f"{name}: {err}")
            return
        figures[name] = save_figure(fig, os.path.join(out_dir, name + ".png"), dpi=dpi)

    attempt("central_slices", lambda: figure_central_slices(run, it, ks))
    attempt("ssnr", lambda: figure_ssnr(run, it, ks, iterations=over))
    attempt("class_distribution", lambda: figure_class_distribution(run, ks, over))
    attempt("class_resolution", lambda: figure_class_resolution(run, ks, over))
    attempt("convergence", lambda: figure_convergence(run, over))
    attempt("angular_distribution",
            lambda: figure_angular_distribution(run, it, classes, projection=angdist))
    for k in ks:
        attempt(f"slices_class{k:03d}", lambda k=k: figure_map_slices(run, it, k, slices_axis))
    cxc = None
    try:
        cxc = chimerax_script(run, it, os.path.join(out_dir, "classes.cxc"), ks)
    except CryoClassError as err:
        notes.append(f"ChimeraX script: {err}")
    bild = {}
    try:
        bild = {k: v["bild"] for k, v in angdist_bild(run, it, out_dir, ks).items()}
    except CryoClassError as err:
        notes.append(f"angular distribution markers: {err}")

    index = os.path.join(out_dir, "index.html")
    tmp = index + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_html(run, it, figures, cxc, notes, slices_axis, bild))
    os.replace(tmp, index)
    return {"index": index, "figures": figures, "chimerax": cxc, "bild": bild,
            "notes": notes, "iteration": it}


def _html(run, it, figures, cxc, notes, slices_axis, bild=None):
    esc = html.escape
    try:
        opt = run.optimiser(it)
    except CryoClassError:
        opt = {}
    n_total = opt.get("rlnNumberOfIterations")
    its = run.iterations
    status = ""
    if n_total is not None:
        status = (" (finished)" if its[-1] >= int(n_total) else
                  f" of {int(n_total)} (running or stopped)")
    model = run.model(it)
    summ = run.summary(it)
    rows = []
    for _, r in summ.iterrows():
        def cell(lab, fmt):
            v = r.get(lab)
            return "" if v is None or v != v else fmt(v)
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                int(r["class"]),
                cell("rlnClassDistribution", lambda v: f"{100 * v:.1f}%"),
                cell("particles", lambda v: f"{int(v)}"),
                cell("rlnEstimatedResolution",
                     lambda v: f"{v:.2f}" if 0 < v < 999 else "-"),
                cell("rlnAccuracyRotations", lambda v: f"{v:.2f}" if v < 999 else "-"),
                cell("rlnAccuracyTranslationsAngst",
                     lambda v: f"{v:.2f}" if v < 999 else "-"),
            )) + "</tr>")
    general = model.general
    facts = [("Run", esc(run.root)),
             ("Iteration shown", f"{it}{esc(status)}; iterations on disk: "
                                 f"{its[0]}&ndash;{its[-1]}"),
             ("Classes", str(model.n_classes)),
             ("Pixel size", f"{model.pixel_size:g} &Aring;" if model.pixel_size else "?"),
             ("Box", str(general.get("rlnOriginalImageSize", "?"))),
             ("Current resolution",
              f"{float(general['rlnCurrentResolution']):.2f} &Aring;"
              if "rlnCurrentResolution" in general else "?"),
             ("Log-likelihood", esc(str(general.get("rlnLogLikelihood", "?")))),
             ("Average Pmax", esc(str(general.get("rlnAveragePmax", "?"))))]

    def img(name, title, caption):
        fn = os.path.basename(figures[name])
        return (f'<figure id="{esc(name)}"><h2>{esc(title)}</h2>'
                f'<a href="{esc(fn)}"><img src="{esc(fn)}" alt="{esc(title)}"></a>'
                f"<figcaption>{esc(caption)}</figcaption></figure>")

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cryoclass report: {esc(run.name)} iteration {it}</title>",
        "<style>body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 9px;text-align:right}th{background:#f0f0f0}.facts td{text-align:left}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1.2em 0}"
        "h2{font-size:1.1em;margin:.2em 0}figcaption{color:#555;font-size:.9em}"
        ".notes{color:#a40}code{background:#f4f4f4;padding:1px 4px}</style></head><body>",
        f"<h1>cryoclass 3D classification: {esc(run.name)}, iteration {it}</h1>",
        '<table class="facts">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>"
                                          for k, v in facts) + "</table>",
        "<h2>Classes (largest first)</h2><table><tr><th>class</th><th>distribution</th>"
        "<th>particles</th><th>est. resolution (&Aring;)</th><th>accuracy rot. (&deg;)"
        "</th><th>accuracy trans. (&Aring;)</th></tr>" + "".join(rows) + "</table>",
    ]
    titles = [("central_slices", "Classes: central slices"),
              ("ssnr", "Spectral signal-to-noise ratio"),
              ("class_distribution", "Class distribution over iterations"),
              ("class_resolution", "Estimated resolution over iterations"),
              ("convergence", "Convergence"),
              ("angular_distribution", "Angular distribution")]
    for name, title in titles:
        if name in figures:
            parts.append(img(name, title, _CAPTIONS[name]))
    for name in sorted(n for n in figures if n.startswith("slices_class")):
        k = int(name[-3:])
        parts.append(img(name, f"Class {k}: slices",
                         _CAPTIONS["slices"].format(axis=slices_axis, k=k)))
    if cxc:
        fn = os.path.basename(cxc)
        parts.append(f'<h2>3D view</h2><p>ChimeraX script <a href="{esc(fn)}">{esc(fn)}'
                     f"</a>: opens the class maps, fits each into the largest class and "
                     f"tiles them. Run <code>chimerax {esc(os.path.abspath(cxc))}</code>."
                     "</p>")
    if bild:
        links = ", ".join(
            f'class {k}: <a href="{esc(os.path.basename(p))}">'
            f'{esc(os.path.basename(p))}</a> (<a href="'
            f'{esc(os.path.basename(p)[:-5])}.cxc">with the map</a>)'
            for k, p in sorted(bild.items()))
        parts.append("<h2>Angular distribution in ChimeraX</h2><p>One sphere per "
                     "sampled direction, radius proportional to its particles: "
                     f"{links}.</p>")
    if notes:
        parts.append('<h2>Not shown</h2><ul class="notes">' +
                     "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(f'<p style="color:#888;font-size:.8em">written by cryoclass report, '
                 f"{stamp}</p></body></html>")
    return "\n".join(parts) + "\n"


def main(args):
    res = write_report(args.run, args.output, args.iter, parse_classes(args.classes),
                       slices_axis=args.slices_axis, angdist=args.angdist, dpi=args.dpi,
                       overlay_iterations=parse_classes(args.overlay_iters,
                                                        "--overlay-iters"))
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"wrote {len(res['figures'])} figures for iteration {res['iteration']}: "
          f"{res['index']}")
    return 0
