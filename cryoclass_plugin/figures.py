"""Figures of a 3D classification run: pure functions, tables / arrays in, a matplotlib
:class:`~matplotlib.figure.Figure` out.

No pyplot and no global state: every figure is a ``matplotlib.figure.Figure`` with an Agg
canvas attached, so the functions work headless, in threads and inside Scipion's Tk GUI
(which embeds the Figure itself).  :func:`save_figure` writes a PNG.

Inputs are what :class:`cryoclass_plugin.runresults.RunResults` returns (RELION labels
throughout):

========================================  =============================================
:func:`map_slices_figure`                 one map as a grid of slices along z (or y, x)
:func:`central_slices_figure`             central slices of all classes, largest first
:func:`ssnr_figure`                       rlnSsnrMap against resolution, per class
:func:`ssnr_overlay_figure`               the same for several iterations, overlaid
:func:`class_distribution_figure`         rlnClassDistribution over iterations
:func:`class_resolution_figure`           rlnEstimatedResolution over iterations
:func:`convergence_figure`                changes in classes / orientations / offsets,
                                          log-likelihood, average Pmax, resolution
:func:`angular_distribution_figure`       rot/tilt histogram per class (Mollweide)
:func:`write_chimerax_script`             a ChimeraX ``.cxc`` opening, fitting, tiling
:func:`write_angdist_bild`                angular distribution as ChimeraX BILD markers
:func:`launch_chimerax`                   run ChimeraX on it if installed, else a message
========================================  =============================================

Greyscale maps use one contrast per map (robust percentiles of the whole map), with
density white, as RELION's and Scipion's viewers show it.
"""
import math
import os
import shutil
import subprocess

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

__all__ = [
    "map_slices_figure", "central_slices_figure", "ssnr_figure",
    "class_distribution_figure", "class_resolution_figure", "convergence_figure",
    "angular_distribution_figure", "save_figure", "class_color", "map_contrast",
    "write_chimerax_script", "launch_chimerax", "find_chimerax", "auto_level",
    "ssnr_overlay_figure", "direction_counts", "write_angdist_bild",
]

ANGSTROM = "\u00c5"
_AXES = {"z": 0, "y": 1, "x": 2}
# the plane shown by a slice perpendicular to each axis: (row label, column label)
_PLANE = {"z": ("y", "x"), "y": ("z", "x"), "x": ("z", "y")}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _figure(width, height):
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    return fig


def class_color(k):
    """A colour per class number, the same in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if int(k) <= 10 else colormaps["tab20"]
    return cmap((int(k) - 1) % cmap.N)


def map_contrast(vol, low=0.1, high=99.9):
    """(vmin, vmax) for a whole map: robust percentiles, never an empty range."""
    v = np.asarray(vol, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def _grid(n, max_cols):
    ncols = max(1, min(n, max_cols))
    return int(math.ceil(n / ncols)), ncols


def _take(vol, axis, index):
    return np.take(vol, index, axis=_AXES[axis])


def _fmt_pct(frac):
    return "" if frac is None or not np.isfinite(frac) else f"{100 * frac:.1f}%"


def _fmt_res(res):
    if res is None or not np.isfinite(res) or res <= 0 or res >= 999:
        return ""
    return f"{res:.1f} {ANGSTROM}"


def _class_info(classes, k):
    """(distribution fraction, estimated resolution A, particles) of class k from a
    data_model_classes frame (with class_number) or a summary frame (with class)."""
    if classes is None or len(classes) == 0:
        return None, None, None
    col = "class_number" if "class_number" in classes else "class"
    if col not in classes:
        return None, None, None
    rows = classes[classes[col].astype(int) == int(k)]
    if not len(rows):
        return None, None, None
    row = rows.iloc[0]

    def get(lab):
        return float(row[lab]) if lab in row and row[lab] == row[lab] else None
    n = get("particles")
    return get("rlnClassDistribution"), get("rlnEstimatedResolution"), \
        (int(n) if n is not None else None)


def _sorted_classes(ks, classes):
    """Class numbers sorted by rlnClassDistribution (largest first), ties by number."""
    def key(k):
        d = _class_info(classes, k)[0]
        return (-(d if d is not None else -1.0), int(k))
    return sorted(ks, key=key)


def _no_data(ax, text="no data"):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            color="0.5", fontsize=10)


def _integer_x(ax):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)


# ---------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------
def _signal_extent(vol, axis, margin_frac=0.08):
    """(first, last) slice index along ``axis`` where the map rises above its solvent
    (99th percentile of each slice > 15% of the way from the median slice to the
    strongest), widened by a margin; the whole axis when nothing stands out."""
    v = np.moveaxis(np.asarray(vol, dtype=np.float32), _AXES[axis], 0)
    size = v.shape[0]
    prof = np.percentile(v.reshape(size, -1), 99, axis=1)
    base, peak = float(np.median(prof)), float(prof.max())
    if not peak > base:
        return 0, size - 1
    on = np.nonzero(prof > base + 0.15 * (peak - base))[0]
    if len(on) == 0:
        return 0, size - 1
    m = int(round(margin_frac * size))
    lo, hi = max(0, int(on[0]) - m), min(size - 1, int(on[-1]) + m)
    c = size // 2                      # keep the centre inside, symmetric looks better
    half = max(c - lo, hi - c)
    return max(0, c - half), min(size - 1, c + half)


def _widen(lo, hi, n, size):
    extra = n - (hi - lo + 1)
    lo = max(0, lo - (extra + 1) // 2)
    hi = min(size - 1, lo + n - 1)
    return max(0, hi - n + 1), hi


def map_slices_figure(vol, apix=None, axis="z", n_slices=None, max_cols=8, title=None,
                      contrast=None, panel_size=1.25):
    """A grid of slices of one map perpendicular to ``axis`` ('z', 'y' or 'x').

    ``n_slices``: how many evenly spaced slices (default all up to a box of 40, else
    32 spanning the part of the box that holds the particle, see
    :func:`_signal_extent`); the central slice is always one of them.  One greyscale
    for the whole map (``contrast`` = (vmin, vmax) to impose one).
    """
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D map, got shape {vol.shape}")
    if axis not in _AXES:
        raise ValueError(f"axis must be one of z, y, x, not {axis!r}")
    size = vol.shape[_AXES[axis]]
    if n_slices is None:
        n_slices = size if size <= 40 else 32
    n_slices = max(1, min(int(n_slices), size))
    lo, hi = (0, size - 1) if n_slices >= size else _signal_extent(vol, axis)
    if hi - lo + 1 < n_slices:
        lo, hi = _widen(lo, hi, n_slices, size)
    idx = np.unique(np.round(np.linspace(lo, hi, n_slices)).astype(int))
    centre = size // 2
    if centre not in idx:
        idx[np.argmin(np.abs(idx - centre))] = centre
        idx = np.unique(idx)
    vmin, vmax = contrast if contrast is not None else map_contrast(vol)
    nrows, ncols = _grid(len(idx), max_cols)
    # one montage image (fast to draw whatever the number of slices), white gutters
    first = _take(vol, axis, 0)
    h, w = first.shape
    gap = max(1, int(round(0.12 * max(h, w))))
    mont = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap), np.nan, np.float32)
    for n, i in enumerate(idx):
        r, c = divmod(n, ncols)
        mont[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = \
            _take(vol, axis, i)
    from matplotlib import colormaps
    cmap = colormaps["gray"].with_extremes(bad="white")
    fig = _figure(ncols * panel_size + 1.0, nrows * panel_size * (h + gap) / (w + gap) + 0.6)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(mont), cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    for n, i in enumerate(idx):
        r, c = divmod(n, ncols)
        lab = f"{axis}={i}" + (f" ({(i - centre) * apix:+.0f} {ANGSTROM})" if apix else "")
        ax.text(c * (w + gap) + 0.04 * w, r * (h + gap) + 0.04 * h, lab, color="#ffd75e",
                fontsize=6.5, va="top", ha="left",
                fontweight="bold" if i == centre else "normal")
    ax.set_axis_off()
    cb = fig.colorbar(im, ax=ax, shrink=0.6, pad=0.01, aspect=30)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("density", fontsize=8)
    box = "x".join(str(s) for s in vol.shape[::-1])
    sub = f"box {box}" + (f", {apix:.2f} {ANGSTROM}/px" if apix else "")
    if len(idx) < size:
        step = (idx[-1] - idx[0]) / max(len(idx) - 1, 1)
        sub += (f"; {axis}={idx[0]}..{idx[-1]}" + (f" every {step:.3g}" if step > 1.01
                                                     else ""))
    fig.suptitle(f"{title + ' - ' if title else ''}slices along {axis} ({sub})", fontsize=10)
    return fig


def central_slices_figure(maps, classes=None, apix=None, title=None,
                          axes=("z", "y", "x"), mode="slice", panel_size=1.7):
    """Central slices (or projections, ``mode='projection'``) of every class side by
    side, one column per class sorted by rlnClassDistribution (largest first), one row
    per axis.  Columns are labelled with class number, distribution (%) and estimated
    resolution (A); ``classes`` is data_model_classes (with ``class_number``) or a
    :meth:`RunResults.summary` frame.  Contrast is set per map.
    """
    if not maps:
        raise ValueError("no class maps to show")
    ks = _sorted_classes(list(maps), classes)
    nrows, ncols = len(axes), len(ks)
    fig = _figure(ncols * panel_size + 0.8, nrows * panel_size + 1.0)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    for c, k in enumerate(ks):
        vol = np.asarray(maps[k])
        if mode == "projection":
            planes = [vol.sum(axis=_AXES[a]) for a in axes]
            lo = min(map_contrast(p)[0] for p in planes)
            hi = max(map_contrast(p)[1] for p in planes)
        else:
            planes = [_take(vol, a, vol.shape[_AXES[a]] // 2) for a in axes]
            lo, hi = map_contrast(vol)
        dist, res, npart = _class_info(classes, k)
        label = f"Class {k}"
        extra = " | ".join(s for s in (_fmt_pct(dist), _fmt_res(res)) if s)
        if npart is not None:
            extra += ("\n" if extra else "") + f"{npart} particles"
        grid[0, c].set_title(label + ("\n" + extra if extra else ""), fontsize=9,
                             color=class_color(k), fontweight="bold")
        for r, (a, plane) in enumerate(zip(axes, planes)):
            ax = grid[r, c]
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor(class_color(k))
                side.set_linewidth(1.5)
            if c == 0:
                rl, cl = _PLANE[a]
                what = "projection" if mode == "projection" else f"{a}={vol.shape[_AXES[a]] // 2}"
                ax.set_ylabel(f"{cl}{rl} plane\n({what})", fontsize=8)
    if apix:
        _scale_bar(grid[-1, 0], np.asarray(maps[ks[0]]).shape[-1], apix)
    what = "projections" if mode == "projection" else "central slices"
    fig.suptitle(f"{title + ' - ' if title else ''}{what} of {len(ks)} classes, "
                 f"largest first", fontsize=10)
    return fig


def _scale_bar(ax, box, apix):
    """A white scale bar of a round length (about a quarter of the box)."""
    target = box * apix / 4
    nice = [5, 10, 20, 25, 50, 100, 200, 250, 500, 1000]
    length = min(nice, key=lambda v: abs(v - target))
    px = length / apix
    y = box * 0.92
    ax.plot([box * 0.06, box * 0.06 + px], [y, y], color="white", lw=2.5,
            solid_capstyle="butt")
    ax.text(box * 0.06 + px / 2, y - box * 0.04, f"{length:g} {ANGSTROM}", color="white",
            ha="center", va="bottom", fontsize=7)


# ---------------------------------------------------------------------------------------
# SSNR
# ---------------------------------------------------------------------------------------
def _angstrom_top_axis(ax, xmax):
    """Top axis with tick labels in A at positions 1/d (d in A)."""
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    cands = [200, 100, 50, 40, 30, 25, 20, 15, 12, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.5,
             2.2, 2, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]
    lo, hi = ax.get_xlim()
    ticks = [d for d in cands if lo < 1.0 / d <= hi]
    # keep at most ~7 labels, spread over the range
    if len(ticks) > 7:
        pos = np.linspace(0, len(ticks) - 1, 7).round().astype(int)
        ticks = [ticks[i] for i in np.unique(pos)]
    top.set_xticks([1.0 / d for d in ticks])
    top.set_xticklabels([f"{d:g}" for d in ticks], fontsize=8)
    top.set_xlabel(f"Resolution ({ANGSTROM})", fontsize=9)
    return top


def _ssnr_curve(table):
    """(1/A, SSNR) of a data_model_class_N frame without the origin shell, or None."""
    if "rlnSsnrMap" not in table or "rlnResolution" not in table:
        return None
    x = np.asarray(table["rlnResolution"], float)
    y = np.asarray(table["rlnSsnrMap"], float)
    keep = (np.asarray(table["rlnSpectralIndex"], float) > 0 if "rlnSpectralIndex" in table
            else x > 0)
    x, y = x[keep], y[keep]
    ok = np.isfinite(y) & (y > 0)
    return (x, np.where(ok, y, np.nan)) if ok.any() else None   # log axis: no SSNR <= 0


_ITER_STYLES = ["-", "--", "-.", ":"]


def ssnr_figure(class_tables, classes=None, title=None, ymin=1e-2):
    """rlnSsnrMap against rlnResolution (1/A) for each class, log y, with the SSNR = 1
    line, a top axis in A and a dotted mark at each class's rlnEstimatedResolution.

    ``class_tables``: {class number: data_model_class_N frame}.
    """
    return ssnr_overlay_figure({None: (class_tables, classes)}, title=title, ymin=ymin)


def ssnr_overlay_figure(per_iteration, title=None, ymin=1e-2):
    """SSNR curves of several iterations overlaid: one line per (iteration, class),
    coloured by class, the line style and weight by iteration (the latest solid and
    thickest); the estimated-resolution marks are those of the latest iteration.

    ``per_iteration``: {iteration: ({class: data_model_class_N frame},
    data_model_classes)}; the key None means a single unnamed iteration.  Each line's
    label starts with ``it N, class k`` (``class k`` for None).
    """
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    its = sorted(per_iteration, key=lambda i: -1 if i is None else i)
    xmax, ymax, plotted = 0.0, 1.0, 0
    for rank, it in enumerate(its):
        tables, classes = per_iteration[it]
        latest = rank == len(its) - 1
        style = _ITER_STYLES[(len(its) - 1 - rank) % len(_ITER_STYLES)]
        for k in _sorted_classes(list(tables), classes):
            curve = _ssnr_curve(tables[k])
            if curve is None:
                continue
            x, y = curve
            dist, res, _ = _class_info(classes, k)
            lab = f"class {k}" if it is None else f"it {it}, class {k}"
            extra = ", ".join(s for s in (_fmt_pct(dist), _fmt_res(res)) if s)
            if extra:
                lab += f" ({extra})"
            ax.plot(x, y, style, color=class_color(k), lw=1.6 if latest else 1.1,
                    alpha=1.0 if latest else 0.45 + 0.5 * rank / max(len(its) - 1, 1),
                    label=lab)
            if latest and res is not None and 0 < res < 999:
                ax.axvline(1.0 / res, color=class_color(k), ls=":", lw=1.2)
            xmax = max(xmax, float(np.nanmax(x)))
            ymax = max(ymax, float(np.nanmax(y)))
            plotted += 1
    ax.axhline(1.0, color="black", ls="--", lw=1, label="SSNR = 1")
    ax.set_yscale("log")
    ax.set_ylim(ymin, ymax * 2)
    if plotted:
        ax.set_xlim(0, xmax * 1.02)
        _angstrom_top_axis(ax, xmax)
    else:
        _no_data(ax, "no SSNR values")
    ax.set_xlabel(f"Resolution (1/{ANGSTROM})", fontsize=9)
    ax.set_ylabel("SSNR (rlnSsnrMap)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7 if plotted > 8 else 8, loc="upper right", framealpha=0.9,
              ncol=2 if plotted > 12 else 1)
    fig.suptitle(title or "Spectral signal-to-noise ratio per class", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------
# over iterations
# ---------------------------------------------------------------------------------------
def class_distribution_figure(dist, title=None):
    """rlnClassDistribution (shown in %) per class over iterations.

    ``dist``: DataFrame indexed by iteration with one column per class number
    (:meth:`RunResults.class_distribution_series`)."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    if dist is None or dist.empty:
        _no_data(ax)
    else:
        last = dist.iloc[-1]
        for k in sorted(dist.columns, key=lambda c: -float(np.nan_to_num(last[c]))):
            ax.plot(dist.index, 100 * dist[k].astype(float), "-o", ms=3, lw=1.6,
                    color=class_color(k),
                    label=f"class {k} ({100 * float(last[k]):.1f}%)")
        ax.set_ylim(0, min(100, max(5.0, 100 * float(np.nanmax(dist.values)) * 1.15)))
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  title="last iteration", title_fontsize=8)
        _integer_x(ax)
    ax.set_xlabel("Iteration", fontsize=9)
    ax.set_ylabel("Particles in class (%)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.suptitle(title or "Class distribution over iterations", fontsize=10)
    return fig


def class_resolution_figure(res, current=None, title=None):
    """rlnEstimatedResolution (A) per class over iterations; ``current`` (optional
    Series indexed by iteration, rlnCurrentResolution) is drawn dashed."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    if res is None or res.empty or not np.isfinite(res.values.astype(float)).any():
        _no_data(ax)
    else:
        last = res.iloc[-1]
        for k in sorted(res.columns, key=lambda c: float(np.nan_to_num(last[c], nan=1e9))):
            lab = f"class {k}"
            if np.isfinite(float(last[k])):
                lab += f" ({float(last[k]):.1f} {ANGSTROM})"
            ax.plot(res.index, res[k].astype(float), "-o", ms=3, lw=1.6,
                    color=class_color(k), label=lab)
        if current is not None and np.isfinite(np.asarray(current, float)).any():
            ax.plot(current.index, np.asarray(current, float), "--", color="0.3", lw=1.2,
                    label="current resolution\n(rlnCurrentResolution)")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  title="last iteration", title_fontsize=8)
        _integer_x(ax)
    ax.set_xlabel("Iteration", fontsize=9)
    ax.set_ylabel(f"Estimated resolution ({ANGSTROM}, lower is better)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.suptitle(title or "Estimated resolution per class over iterations", fontsize=10)
    return fig


_CONV_PANELS = [
    ("rlnChangesOptimalClasses", "Changes in class assignments", "particles (%)", 100.0),
    ("rlnChangesOptimalOrientations", "Changes in orientations", "degrees", 1.0),
    ("rlnChangesOptimalOffsets", "Changes in offsets", ANGSTROM, 1.0),
    ("rlnLogLikelihood", "Log-likelihood", "rlnLogLikelihood", 1.0),
    ("rlnAveragePmax", "Average Pmax", "rlnAveragePmax", 1.0),
    ("rlnCurrentResolution", "Current resolution", ANGSTROM, 1.0),
]


def convergence_figure(conv, title=None):
    """Six panels over iterations: changes in class assignments (% of particles),
    orientations (degrees) and offsets (A) from optimiser.star; log-likelihood,
    average Pmax and current resolution (A) from model.star.

    ``conv``: :meth:`RunResults.convergence_series` (NaN where undefined)."""
    fig = _figure(10.0, 5.6)
    axes = fig.subplots(2, 3, squeeze=False)
    for ax, (lab, name, unit, scale) in zip(axes.flat, _CONV_PANELS):
        y = None
        if conv is not None and lab in conv:
            y = conv[lab].astype(float) * scale
            if lab in ("rlnLogLikelihood", "rlnAveragePmax"):
                y = y.where(y != 0)           # RELION writes 0 before the first E-step
        if y is None or not np.isfinite(y.values).any():
            _no_data(ax)
        else:
            ax.plot(y.index, y.values, "-o", ms=3.5, lw=1.6, color="#1f5fa8")
            ok = y.dropna()
            ax.margins(x=0.08, y=0.18)
            # the last value, written inside the axes
            ax.text(0.97, 0.93, f"last: {ok.iloc[-1]:.4g}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=7, color="#1f5fa8",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
            if lab == "rlnChangesOptimalClasses":
                ax.set_ylim(bottom=0)
            _integer_x(ax)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("Iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "Convergence", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------
# angular distribution
# ---------------------------------------------------------------------------------------
def angular_distribution_figure(particles, classes=None, class_info=None,
                                projection="mollweide", n_rot=36, n_tilt=18, title=None,
                                max_cols=3):
    """Histogram of projection directions (rlnAngleRot, rlnAngleTilt) per class.

    ``projection='mollweide'``: equal-area bins (uniform in cos(tilt)) on a Mollweide
    map, longitude = rot, latitude = 90 - tilt (tilt 0 at the top); ``'rect'``: a plain
    rot x tilt histogram.  ``classes``: class numbers to show (default all in the
    table, largest first); ``class_info``: data_model_classes for the distribution in
    the titles.  Colour = particles per bin.
    """
    if projection not in ("mollweide", "rect"):
        raise ValueError("projection must be 'mollweide' or 'rect'")
    for lab in ("rlnAngleRot", "rlnAngleTilt"):
        if lab not in particles:
            raise ValueError(f"the particle table has no {lab}")
    cls = (particles["rlnClassNumber"].astype(int).to_numpy()
           if "rlnClassNumber" in particles else np.ones(len(particles), int))
    rot = ((particles["rlnAngleRot"].astype(float).to_numpy() + 180.0) % 360.0) - 180.0
    tilt = np.clip(particles["rlnAngleTilt"].astype(float).to_numpy(), 0, 180)
    if classes is None:
        ks = sorted(set(cls.tolist()), key=lambda k: (-(cls == k).sum(), k))
    else:
        ks = [int(k) for k in classes]
    if not ks:
        ks = [1]
    nrows, ncols = _grid(len(ks), max_cols)
    fig = _figure(ncols * 4.2 + 0.3, nrows * 2.3 + 0.5)
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    rot_edges = np.linspace(-180, 180, n_rot + 1)
    if projection == "mollweide":
        # equal-area bands: uniform in sin(latitude) = cos(tilt)
        lat_edges = np.degrees(np.arcsin(np.linspace(-1, 1, n_tilt + 1)))
    else:
        lat_edges = np.linspace(0, 180, n_tilt + 1)
    for i, k in enumerate(ks):
        sel = cls == k
        if projection == "mollweide":
            ax = fig.add_subplot(nrows, ncols, i + 1, projection="mollweide")
            h, _, _ = np.histogram2d(rot[sel], 90.0 - tilt[sel], [rot_edges, lat_edges])
            ax.set_facecolor("#eeeeee")
            mesh = ax.pcolormesh(np.radians(rot_edges), np.radians(lat_edges),
                                 np.ma.masked_equal(h.T, 0), cmap=cmap, vmin=0,
                                 vmax=max(1.0, h.max()), shading="flat", rasterized=True)
            lat_ticks = [-60, -30, 0, 30, 60]
            ax.set_yticks(np.radians(lat_ticks))
            ax.set_yticklabels([f"{90 - t}\u00b0" for t in lat_ticks], fontsize=6)
            # meridians every 60 degrees; their labels would sit on the data, so the
            # range is given in the axis label instead
            ax.set_xticks(np.radians([-120, -60, 0, 60, 120]))
            ax.set_xticklabels([])
            ax.grid(True, color="0.45", alpha=0.5, lw=0.5)
            ax.set_xlabel("rot: -180\u00b0 (left) to 180\u00b0 (right), meridians every "
                          "60\u00b0", fontsize=7, labelpad=2)
            ax.set_ylabel("tilt", fontsize=7, labelpad=1)
        else:
            ax = fig.add_subplot(nrows, ncols, i + 1)
            h, _, _ = np.histogram2d(rot[sel], tilt[sel], [rot_edges, lat_edges])
            ax.set_facecolor("#eeeeee")
            mesh = ax.pcolormesh(rot_edges, lat_edges, np.ma.masked_equal(h.T, 0),
                                 cmap=cmap, vmin=0, vmax=max(1.0, h.max()),
                                 shading="flat", rasterized=True)
            ax.set_xlim(-180, 180)
            ax.set_ylim(180, 0)
            ax.set_xticks([-180, -90, 0, 90, 180])
            ax.set_yticks([0, 45, 90, 135, 180])
            ax.tick_params(labelsize=7)
            ax.set_xlabel("rot (\u00b0)", fontsize=8)
            ax.set_ylabel("tilt (\u00b0)", fontsize=8)
        cb = fig.colorbar(mesh, ax=ax, shrink=0.75, pad=0.02, aspect=20)
        cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        cb.ax.tick_params(labelsize=6)
        cb.set_label("particles / bin (grey: none)", fontsize=7)
        dist = _class_info(class_info, k)[0]
        extra = f", {_fmt_pct(dist)}" if dist is not None else ""
        ax.set_title(f"Class {k}: {int(sel.sum())} particles{extra}", fontsize=9,
                     color=class_color(k), fontweight="bold")
    fig.suptitle(title or "Angular distribution (projection directions)", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
def save_figure(fig, path, dpi=110):
    """Write a figure (PNG, or whatever the extension says); returns ``path``."""
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


# ---------------------------------------------------------------------------------------
# ChimeraX
# ---------------------------------------------------------------------------------------
def auto_level(vol):
    """A surface threshold for a map: mean + 2.5 SD of the map, kept below 80% of its
    maximum (encloses the particle of a class map with a near-zero solvent)."""
    v = np.asarray(vol, dtype=np.float64)
    lvl = v.mean() + 2.5 * v.std()
    vmax = v.max()
    if vmax > 0 and lvl > 0.8 * vmax:
        lvl = 0.5 * vmax
    return float(lvl)


def write_chimerax_script(map_paths, out_cxc, apix=None, levels=None, labels=None,
                          fit=True, tile=True, colors=None):
    """Write a ChimeraX command script that opens ``map_paths`` (the first one is the
    reference: pass the largest class first), sets voxel size and surface levels,
    fits every other map into it (``fitmap #i inMap #1``) and tiles them.

    ``levels``: one threshold per map (default :func:`auto_level` of each map when it
    can be read, else ChimeraX's own); ``labels``: names shown in the log.
    Returns the script path.
    """
    paths = [os.path.abspath(os.fspath(p)) for p in map_paths]
    if not paths:
        raise ValueError("no maps for the ChimeraX script")
    if levels is None:
        levels = []
        for p in paths:
            try:
                import mrcfile
                with mrcfile.open(p, permissive=True) as mrc:
                    levels.append(auto_level(mrc.data))
            except Exception:
                levels.append(None)
    palette = ["#b0b0e8", "#e8b0b0", "#b0e8b0", "#e8d8a0", "#c8a8e0", "#a0d8d8",
               "#e8a8d0", "#c0c0a0", "#a8c8f0", "#f0c0a0"]
    lines = ["# ChimeraX script written by cryoclass: open classes, fit them into #1, tile",
             "# run with:  chimerax " + os.path.basename(os.fspath(out_cxc)),
             "set bgColor white", "lighting soft"]
    for i, p in enumerate(paths, start=1):
        lines.append(f'open "{p}"' if " " in p else f"open {p}")
        opts = []
        if apix:
            opts.append(f"voxelSize {float(apix):g}")
        if levels and i - 1 < len(levels) and levels[i - 1] is not None:
            opts.append(f"level {levels[i - 1]:.5g}")
        color = (colors[i - 1] if colors and i - 1 < len(colors)
                 else palette[(i - 1) % len(palette)])
        opts.append(f"color {color}")
        lines.append(f"volume #{i} style surface " + " ".join(opts))
        if labels and i - 1 < len(labels):
            lines.append(f"rename #{i} \"{labels[i - 1]}\"")
    if fit and len(paths) > 1:
        for i in range(2, len(paths) + 1):
            lines.append(f"fitmap #{i} inMap #1")
    if tile and len(paths) > 1:
        lines.append("tile")
    lines.append("view")
    out_cxc = os.fspath(out_cxc)
    d = os.path.dirname(out_cxc)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(out_cxc, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out_cxc


def direction_counts(rot, tilt, directions, chunk=4096):
    """Particles per sampled direction: each projection direction (RELION ``rot``,
    ``tilt`` in degrees, i.e. the unit vector ``(sin t cos r, sin t sin r, cos t)``) is
    counted at the nearest of ``directions`` ((n, 3) unit vectors).  Returns (n,) ints."""
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    r = np.radians(np.asarray(rot, dtype=np.float64).ravel())
    t = np.radians(np.asarray(tilt, dtype=np.float64).ravel())
    v = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)
    counts = np.zeros(len(d), dtype=np.int64)
    for i in range(0, len(v), chunk):
        nearest = np.argmax(v[i:i + chunk] @ d.T, axis=1)
        counts += np.bincount(nearest, minlength=len(d))
    return counts


def write_angdist_bild(path, directions, counts, centre, distance, max_radius,
                       color=(1.0, 0.55, 0.0), comment=None):
    """Write an angular distribution as a ChimeraX BILD file (``open file.bild``).

    One ``.sphere x y z r`` per direction holding particles, at ``centre + distance *
    direction`` (A, the map's frame: x, y, z with the map's origin at 0), radius
    ``max_radius * count / max(count)`` (A), after one ``.color r g b`` (0..1).
    ``comment`` goes in a ``.comment`` line first.  Returns the number of markers.
    """
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    counts = np.asarray(counts, dtype=np.int64).ravel()
    if len(counts) != len(d):
        raise ValueError(f"{len(counts)} counts for {len(d)} directions")
    top = int(counts.max()) if len(counts) else 0
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    lines = []
    if comment:
        lines.append(".comment " + " ".join(str(comment).split()))
    lines.append(".color %.4f %.4f %.4f" % tuple(float(v) for v in color[:3]))
    for vec, n in zip(d, counts):
        if n <= 0:
            continue
        x, y, z = c + distance * vec
        lines.append(f".sphere {x:.3f} {y:.3f} {z:.3f} {max_radius * n / top:.4f}")
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return int((counts > 0).sum())


def find_chimerax():
    """Path of a ChimeraX executable (PATH, then $CHIMERAX_HOME / $CHIMERA_HOME), or None."""
    for name in ("chimerax", "ChimeraX"):
        exe = shutil.which(name)
        if exe:
            return exe
    for env in ("CHIMERAX_HOME", "CHIMERA_HOME"):
        home = os.environ.get(env)
        if home:
            for rel in ("bin/ChimeraX", "bin/chimerax"):
                exe = os.path.join(home, rel)
                if os.access(exe, os.X_OK):
                    return exe
    return None


def launch_chimerax(cxc_path, wait=False):
    """Open a script in ChimeraX when installed; returns (started, message).

    Without ChimeraX the message gives the script's path to open by hand; nothing
    raises, so GUI code can show the message as is.
    """
    cxc_path = os.path.abspath(os.fspath(cxc_path))
    exe = find_chimerax()
    if not exe:
        return False, (f"ChimeraX not found on PATH; open {cxc_path} in ChimeraX "
                       f"(chimerax {cxc_path})")
    try:
        proc = subprocess.Popen([exe, cxc_path], cwd=os.path.dirname(cxc_path))
        if wait:
            proc.wait()
    except OSError as err:
        return False, f"could not start {exe} ({err}); open {cxc_path} in ChimeraX"
    return True, f"started {exe} {cxc_path}"
