"""Worker threads of the CPU projection and insertion (``--j``): the same slices and the
same sums, bit for bit, whatever the number of threads."""
import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import projector as pj
from cryoclass_plugin.engine import workers
from cryoclass_plugin.engine.fourier import half_plane_pixels
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.simulate import simulate_dataset


@pytest.fixture
def restore_workers():
    yield
    workers.set_workers(1)


def test_map_ranges_keeps_the_order_of_the_ranges(restore_workers):
    workers.set_workers(3)
    ranges = workers.split(100, 7)
    assert ranges[0] == (0, 7) and ranges[-1] == (98, 100) and len(ranges) == 15
    assert workers.map_ranges(lambda a, b: (a, b), ranges) == ranges


@pytest.mark.parametrize("n_workers", [2, 3])
def test_projection_and_insertion_do_not_depend_on_the_threads(restore_workers, n_workers):
    box, shell = 32, 12
    rng = np.random.default_rng(4)
    vol = rng.normal(size=(box,) * 3).astype(np.float32)
    ky, kx = half_plane_pixels(box, shell)
    n_rot = 300        # several projection and insertion chunks
    mats = euler_to_matrix(rng.uniform(0, 360, n_rot),
                           np.rad2deg(np.arccos(rng.uniform(-1, 1, n_rot))),
                           rng.uniform(0, 360, n_rot)).astype(np.float32)
    results = []
    for n in (1, n_workers):
        workers.set_workers(n)
        slices = pj.Projector(vol, pad=2, max_shell=shell + 1).project(mats, ky, kx)
        bp = pj.BackProjector(box, pad=2, max_shell=shell + 1)
        chunk = max(1, pj._INSERT_ENTRIES_CPU // (8 * ky.size))
        assert n_rot > 2 * chunk or n_rot > 2 * pj._ROTATION_CHUNK_CPU
        bp.insert(mats, ky, kx, slices, np.abs(slices).astype(np.float32))
        results.append((slices, bp.data.copy(), bp.weight.copy()))
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    assert np.abs(results[0][1]).max() > 0


def test_insertion_adds_each_q_x_zero_corner_at_its_mate_too():
    """The Hermitian symmetrisation of the insertion: a slice inserted is the sum of its
    contribution and its mate's, so inserting a slice and its Friedel mate's rotation
    (the same plane) gives a grid whose q_x = 0 plane is Hermitian."""
    box, shell = 16, 6
    ky, kx = half_plane_pixels(box, shell)
    rng = np.random.default_rng(2)
    mats = euler_to_matrix(rng.uniform(0, 360, 5), rng.uniform(0, 180, 5),
                           rng.uniform(0, 360, 5)).astype(np.float32)
    values = (rng.normal(size=(5, ky.size)) + 1j * rng.normal(size=(5, ky.size))).astype(np.complex64)
    bp = pj.BackProjector(box, pad=2, max_shell=shell + 1)
    bp.insert(mats, ky, kx, values, np.ones(values.shape, np.float32))
    data, weight = bp.symmetrised()
    g = bp.grid
    plane = data.reshape(2 * g.h + 1, 2 * g.h + 1, g.h + 1)[:, :, 0]
    w_plane = weight.reshape(plane.shape[0], plane.shape[1], -1)[:, :, 0]
    assert np.allclose(plane, np.conj(plane[::-1, ::-1]), atol=1e-9)
    assert np.allclose(w_plane, w_plane[::-1, ::-1], atol=1e-9)
    assert w_plane.sum() > 0


def test_refine_gives_the_same_classes_and_maps_with_one_and_three_threads(tmp_path):
    """Projection and insertion are exact across threads (above); BLAS and the FFTs sum
    in another order with more threads, so the maps agree to float32 rounding only."""
    simulate_dataset(str(tmp_path / "data"), n=60, box=32, apix=7.0, snr=1.0, n_classes=2,
                     seed=3)
    maps, classes = [], []
    for j in ("1", "3"):
        out = tmp_path / f"j{j}" / "run"
        assert cli.main(["refine", "--i", str(tmp_path / "data" / "particles.star"),
                         "--ref", str(tmp_path / "data" / "ref.mrc"), "--o", str(out),
                         "--K", "2", "--iter", "2", "--tau2_fudge", "4", "--ini_high", "40",
                         "--particle_diameter", "200", "--zero_mask", "--ctf",
                         "--healpix_order", "1", "--offset_range", "2", "--offset_step", "2",
                         "--random_seed", "1", "--j", j, "--verb", "0"]) == 0
        maps.append([read_map(str(out) + f"_it002_class00{k}.mrc")[0] for k in (1, 2)])
        classes.append(starfile.read(str(out) + "_it002_data.star")["particles"]
                       ["rlnClassNumber"].to_numpy())
    assert (classes[0] == classes[1]).all()
    for a, b in zip(*maps):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_unthreaded_calls_stay_on_the_calling_thread(restore_workers):
    """CuPy work (``threaded=False``) must not move to the worker threads, whatever --j:
    a new thread would use another device and another stream."""
    import threading
    workers.set_workers(3)
    me = threading.get_ident()
    ranges = workers.split(40, 4)
    assert set(workers.map_ranges(lambda a, b: threading.get_ident(), ranges,
                                  threaded=False)) == {me}
    seen = []
    workers.map_in_order(lambda i: (i, threading.get_ident()), seen.append, range(10),
                         threaded=False)
    assert seen == [(i, me) for i in range(10)]


def test_map_in_order_applies_in_the_items_order(restore_workers):
    import time
    workers.set_workers(3)
    applied = []
    # Later items finish first: the applies must still come in the items' order.
    workers.map_in_order(lambda i: (time.sleep(0.002 * (10 - i)), i)[1], applied.append,
                         range(10))
    assert applied == list(range(10))


def test_a_map_inside_a_worker_thread_runs_in_that_thread():
    """A nested map (a projection inside a sub-batch computed on a worker) must not wait
    for the pool's own threads, which may all be busy with the outer map's items."""
    import threading
    workers.set_workers(2)
    try:
        def compute(item):
            names = workers.map_ranges(lambda a, b: threading.current_thread().name,
                                       [(0, 1), (1, 2), (2, 3)])
            assert set(names) == {threading.current_thread().name}
            return item
        done = []
        worker = threading.Thread(target=workers.map_in_order,
                                  args=(compute, done.append, list(range(6))))
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "nested map did not finish"
        assert done == list(range(6))
    finally:
        workers.set_workers(1)
