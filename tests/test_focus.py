"""Class references that share the consensus (engine/focus.py)."""
import numpy as np

from cryoclass_plugin.engine.focus import difference_weights, shared_consensus_references
from cryoclass_plugin.engine.fourier import low_pass
from cryoclass_plugin.engine.masks import soft_sphere_mask

BOX, APIX = 48, 4.0


def _blob(centre, sigma_px):
    z, y, x = np.meshgrid(*[np.arange(BOX) - BOX // 2] * 3, indexing="ij")
    d2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    return np.exp(-d2 / (2 * sigma_px ** 2))


def _classes(noise, seed=0):
    """Three classes: a common body, plus a domain present (class 0), absent (class 1)
    or moved by 4 px (class 2); each map with its own white noise (reconstruction noise)."""
    body = _blob((0, 0, 0), 6.0) + _blob((0, 8, 0), 4.0)
    truth = np.stack([body + _blob((8, -6, 4), 3.0), body,
                      body + _blob((8, -6, 8), 3.0)]).astype(np.float32)
    rng = np.random.default_rng(seed)
    noisy = truth + noise * rng.standard_normal(truth.shape).astype(np.float32)
    # Reconstructions are band-limited; so is their noise.
    noisy = np.stack([low_pass(v, APIX, 12.0) for v in noisy])
    return truth, noisy


def test_identical_classes_give_the_maps_back():
    _, noisy = _classes(0.05)
    same = np.repeat(noisy[:1], 3, axis=0)
    inside = soft_sphere_mask(BOX, 20, 3.0)
    refs, m = shared_consensus_references(same, np.full(3, 1 / 3), APIX, 25.0, inside)
    assert np.allclose(refs, same, atol=1e-5)


def test_references_keep_the_differences_and_drop_the_noise():
    truth, noisy = _classes(0.08)
    inside = soft_sphere_mask(BOX, 20, 3.0)
    w = np.full(3, 1 / 3)
    refs, m = shared_consensus_references(noisy, w, APIX, 25.0, inside)
    # The weights are high where the domain differs and low on the common body.
    domain = _blob((8, -6, 6), 3.0) > 0.5
    # The common body away from the domain (the 25 A low-pass spreads the difference
    # by ~6 px around the domain).
    far = _blob((8, -6, 6), 3.0) < np.exp(-10.0 ** 2 / (2 * 3.0 ** 2))
    body = ((_blob((0, 0, 0), 6.0) > 0.5) | (_blob((0, 8, 0), 4.0) > 0.5)) & far
    assert m[domain].mean() > 0.6, m[domain].mean()
    assert m[body].mean() < 0.2, m[body].mean()
    # Class-minus-class differences of the references match the true ones better than
    # those of the noisy maps (the quantity that decides a particle's class).
    true_lp = np.stack([low_pass(v, APIX, 25.0) for v in truth])

    def err(maps):
        e = 0.0
        for a, b in ((0, 1), (0, 2), (1, 2)):
            e += np.sum(((maps[a] - maps[b]) - (true_lp[a] - true_lp[b])) ** 2 * inside)
        return e
    raw_lp = np.stack([low_pass(v, APIX, 25.0) for v in noisy])
    assert err(refs) < 0.6 * err(raw_lp), (err(refs), err(raw_lp))
    # Beyond 25 A (and the filter's 4-shell edge) the references are nearly the consensus:
    # only the smooth weights m(x) spread some of the low-resolution differences there.
    def high_diff(maps):
        hi = maps - np.stack([low_pass(v, APIX, 15.0) for v in maps])
        return np.sum((hi[0] - hi[1]) ** 2) + np.sum((hi[0] - hi[2]) ** 2)
    assert high_diff(refs) < 0.05 * high_diff(noisy), (high_diff(refs), high_diff(noisy))


def test_difference_weights_are_zero_for_pure_noise():
    rng = np.random.default_rng(3)
    dev = rng.standard_normal((3, BOX, BOX, BOX)).astype(np.float64) * 0.1
    inside = soft_sphere_mask(BOX, 20, 3.0)
    m = difference_weights(dev, np.full(3, 1 / 3), inside, APIX)
    assert m[inside > 0.5].mean() < 0.1


def test_a_given_consensus_replaces_the_mean_of_the_class_maps():
    _, noisy = _classes(0.08)
    inside = soft_sphere_mask(BOX, 20, 3.0)
    w = np.array([0.5, 0.3, 0.2])
    plain, m = shared_consensus_references(noisy, w, APIX, 25.0, inside)
    other = _blob((0, 0, 0), 5.0).astype(np.float32)
    given, m2 = shared_consensus_references(noisy, w, APIX, 25.0, inside, consensus=other)
    mean = np.tensordot(w, noisy.astype(np.float64), axes=1)
    assert np.allclose(m, m2)
    for k in range(3):
        assert np.allclose(given[k] - plain[k], other - mean, atol=1e-5)


def test_joint_consensus_is_sharper_than_the_mean_of_the_class_maps():
    """Two classes of the same structure, each reconstructed from half of the noisy
    projections: the reconstruction of their summed sums (the joint consensus) is
    closer to the truth than the mean of the two Wiener-filtered class maps, and equals
    a reconstruction of all projections in one back-projector."""
    from types import SimpleNamespace
    from cryoclass_plugin.engine.fourier import half_plane_pixels
    from cryoclass_plugin.engine.geometry import euler_to_matrix
    from cryoclass_plugin.engine.mstep import (Accumulators, power_spectrum_half,
                                               reconstruct_consensus)
    from cryoclass_plugin.engine.projector import BackProjector, Projector
    truth = (_blob((0, 0, 0), 4.0) + _blob((6, -4, 2), 2.0)).astype(np.float32)
    rng = np.random.default_rng(5)
    n = 400
    eul = np.c_[rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                rng.uniform(0, 360, n)]
    mats = euler_to_matrix(*eul.T)
    ky, kx = half_plane_pixels(BOX, BOX // 2 - 1)
    clean = Projector(truth, pad=2, gridding=False).project(mats, ky, kx)
    sigma = 2.0 * np.abs(clean).mean()
    noisy = clean + sigma * (rng.standard_normal(clean.shape)
                             + 1j * rng.standard_normal(clean.shape)).astype(np.complex64)
    weights = np.full(clean.shape, 1.0 / sigma ** 2, np.float32)
    acc = Accumulators(2, 1, BOX, 2, np)
    everything = BackProjector(BOX, 2, np)
    for k, half in enumerate((slice(0, n // 2), slice(n // 2, n))):
        acc.backprojectors[k].insert(mats[half], ky, kx, noisy[half] / sigma ** 2, weights[half])
    everything.insert(mats, ky, kx, noisy / sigma ** 2, weights)
    tau2 = power_spectrum_half(truth)
    model = SimpleNamespace(consensus_ref=None, pdf_class=np.array([0.5, 0.5]),
                            tau2=np.stack([tau2, tau2]))
    settings = SimpleNamespace(tau2_fudge=1.0, gridding=False, tau2_estimate="power",
                               consensus_tau2_estimate="power")
    reconstruct_consensus(acc, model, settings)
    assert np.allclose(model.consensus_ref,
                       everything.reconstruct(tau2=tau2, gridding=False), atol=1e-5)
    mean = 0.5 * sum(bp.reconstruct(tau2=tau2, gridding=False) for bp in acc.backprojectors)

    def err(v):
        return np.sum((v - truth) ** 2)
    assert err(model.consensus_ref) < 0.92 * err(mean), (err(model.consensus_ref), err(mean))


def _references_of(init_classes, auto_mask_sigma, iteration, refs, pdf, solvent_mask=""):
    """:func:`.iteration.estep_references` of ``iteration``'s plan on given class maps,
    without data."""
    from types import SimpleNamespace
    from cryoclass_plugin.engine.iteration import estep_references
    from cryoclass_plugin.engine.options import Settings
    from cryoclass_plugin.engine.plan import ScheduleState, plan_iteration
    s = Settings(input_star="x.star", output_root="o", ref="r.mrc", n_classes=len(refs),
                 particle_diameter=BOX * APIX * 0.9, init_classes=init_classes,
                 consensus_iter=4, auto_mask_sigma=auto_mask_sigma,
                 solvent_mask=solvent_mask).resolved()
    ctx = SimpleNamespace(settings=s, xp=np, data=SimpleNamespace(box=BOX, apix=APIX))
    plan = plan_iteration(s, ScheduleState.initial(s), iteration)
    model = SimpleNamespace(refs=refs, pdf_class=np.asarray(pdf), consensus_ref=None)
    return estep_references(ctx, model, plan)


def test_estep_references_are_masked_around_the_density():
    """With a consensus / PCA start the E-step references are masked around the
    density of their mean (default threshold 3 sigma): zero far from it, unchanged on
    it.  RELION's start, a user's ``--solvent_mask`` and ``--auto_mask_sigma 0`` leave
    them as they are, and so does the first iteration (its map is the unaligned
    reference)."""
    from cryoclass_plugin.engine.masks import auto_solvent_mask
    from cryoclass_plugin.engine.options import AUTO_MASK_SIGMA
    truth, noisy = _classes(0.05)
    pdf = [0.4, 0.3, 0.3]
    masked = _references_of("pca", -1.0, 3, noisy, pdf)   # consensus phase: no sharing
    inside = soft_sphere_mask(BOX, BOX * 0.9 / 2, 3.0)
    mask = auto_solvent_mask(np.tensordot(np.asarray(pdf), noisy.astype(np.float64),
                                          axes=1), APIX, inside, AUTO_MASK_SIGMA)
    np.testing.assert_allclose(masked, noisy * mask[None], rtol=1e-5, atol=1e-7)
    assert 0.02 < mask.mean() < 0.5 * inside.mean()
    on_density = truth.max(axis=0) > 0.5
    np.testing.assert_allclose(masked[:, on_density], noisy[:, on_density], rtol=1e-6)
    # noise far from the density is gone (was there before)
    far = mask == 0
    assert np.abs(noisy[:, far]).max() > 0.01 and np.all(masked[:, far] == 0)
    for plain in (_references_of("relion", -1.0, 3, noisy, pdf),
                  _references_of("pca", 0.0, 3, noisy, pdf),
                  _references_of("pca", -1.0, 3, noisy, pdf, solvent_mask="mask.mrc"),
                  _references_of("pca", -1.0, 1, noisy, pdf)):
        np.testing.assert_array_equal(plain, noisy)
    # an explicit threshold applies to RELION's start too
    assert np.all(_references_of("relion", 3.0, 3, noisy, pdf)[:, far] == 0)
