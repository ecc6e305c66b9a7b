"""HEALPix pixel centres in the NESTED scheme (numpy, vectorised, no healpy).

Order ``n`` has ``Nside = 2**n`` and ``12 * 4**n`` pixels of equal area.  In the NESTED
scheme the four children of pixel ``p`` at order ``n`` are pixels ``4p .. 4p+3`` at order
``n + 1`` (more generally ``p * 4**k + c`` for ``c < 4**k`` at order ``n + k``), which is
what makes RELION's adaptive oversampling a matter of index arithmetic.

The algorithm is the one of Gorski et al. (2005, ApJ 622, 759) as coded in the HEALPix
C++ library (``Healpix_Base::pix2loc``, ``nest2xyf``) that RELION links: a NESTED index
splits into a base face (0..11) and interleaved bits giving the position ``(ix, iy)``
inside the face; these give the ring number ``jr`` (from the north pole) and the
position along the ring.

Directions and RELION angles
----------------------------
A pixel centre is the unit vector ``(sin t cos p, sin t sin p, cos t)`` for colatitude
``t`` (theta) and longitude ``p`` (phi).  RELION uses it as a projection direction with
``rot = phi`` and ``tilt = theta`` (degrees, :func:`pixel_angles_deg`): with
:func:`.geometry.euler_to_matrix` the third row of the rotation matrix is
``A[2] = (sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))``, i.e. the direction, for
any psi.  Like RELION (``HealpixSampling::checkDirection``) ``rot`` is returned in
``(-180, 180]`` and ``tilt`` in ``[0, 180]``.
"""
import numpy as np

from .errors import CryoClassError

# Base-face ring and longitude offsets (HEALPix's jrll / jpll).
_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)

MAX_ORDER = 13  # Nside 8192; RELION's Healpix_Base uses int and stops there too.


def _check_order(order):
    if int(order) != order or not 0 <= order <= MAX_ORDER:
        raise CryoClassError(f"HEALPix order {order!r} is not an integer in 0..{MAX_ORDER}")
    return int(order)


def nside(order):
    """``Nside = 2**order``."""
    return 1 << _check_order(order)


def npix(order):
    """Number of pixels at ``order``: ``12 * 4**order``."""
    return 12 << (2 * _check_order(order))


def _compress_bits(v, order):
    """Take the bits of ``v`` at even positions 0, 2, 4, ... and pack them."""
    out = np.zeros_like(v)
    for b in range(order):
        out |= ((v >> (2 * b)) & 1) << b
    return out


def nest2xyf(pix, order):
    """NESTED index -> ``(ix, iy, face)``, int64 arrays; ``ix`` takes the even bits."""
    order = _check_order(order)
    pix = np.asarray(pix, dtype=np.int64)
    if pix.size and (pix.min() < 0 or pix.max() >= npix(order)):
        raise CryoClassError(f"HEALPix pixel index out of range 0..{npix(order) - 1} "
                             f"for order {order}")
    npface = np.int64(1) << (2 * order)
    face = pix >> (2 * order)
    rest = pix & (npface - 1)
    return _compress_bits(rest, order), _compress_bits(rest >> 1, order), face


def pix2zphi(pix, order):
    """NESTED pixel centres as ``(z, phi)`` with ``z = cos(theta)`` and ``phi`` in
    radians in ``[0, 2 pi)``; vectorised over ``pix`` (any shape)."""
    order = _check_order(order)
    ns = np.int64(1) << order
    ix, iy, face = nest2xyf(pix, order)
    jr = (_JRLL[face] << order) - ix - iy - 1          # ring number, 1 .. 4 Nside - 1
    fact2 = 4.0 / (12.0 * ns * ns)
    north = jr < ns
    south = jr > 3 * ns
    nr = np.where(north, jr, np.where(south, 4 * ns - jr, ns))
    tmp = (nr * nr) * fact2
    z = np.where(north, 1.0 - tmp,
                 np.where(south, tmp - 1.0, (2 * ns - jr) * (2.0 / (3.0 * ns))))
    t = _JPLL[face] * nr + ix - iy
    t = np.where(t < 0, t + 8 * nr, np.where(t >= 8 * nr, t - 8 * nr, t))
    phi = (0.25 * np.pi) * t / nr
    return z, phi


def pix2vec(pix, order):
    """NESTED pixel centres as unit vectors ``(..., 3)`` ordered (x, y, z)."""
    z, phi = pix2zphi(pix, order)
    s = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=-1)


def pixel_angles_deg(pix, order):
    """RELION ``(rot, tilt)`` in degrees of NESTED pixel centres.

    ``rot = phi`` wrapped into ``(-180, 180]`` and ``tilt = theta = arccos(z)`` in
    ``[0, 180]``, as ``HealpixSampling::getDirectionFromHealPix`` does.
    """
    z, phi = pix2zphi(pix, order)
    rot = np.rad2deg(phi)
    rot = np.where(rot > 180.0, rot - 360.0, rot)
    tilt = np.rad2deg(np.arccos(np.clip(z, -1.0, 1.0)))
    return rot, tilt


def children(pix, order_increase=1):
    """NESTED children of ``pix`` ``order_increase`` orders finer: shape
    ``pix.shape + (4**order_increase,)``, child ``c`` of ``p`` being ``p * 4**k + c``."""
    k = int(order_increase)
    if k < 0:
        raise CryoClassError(f"order increase {order_increase!r} must be >= 0")
    pix = np.asarray(pix, dtype=np.int64)
    return (pix[..., None] << (2 * k)) + np.arange(1 << (2 * k), dtype=np.int64)


def max_pixrad(order):
    """Largest angular distance (radians) between a pixel centre and its corners
    (``Healpix_Base::max_pixrad``); every point of the sphere lies within this distance
    of the centre of the pixel that contains it."""
    ns = nside(order)
    za, pa = 2.0 / 3.0, np.pi / (4 * ns)
    t1 = (1.0 - 1.0 / ns) ** 2
    zb, pb = 1.0 - t1 / 3.0, 0.0

    def vec(z, p):
        s = np.sqrt(1.0 - z * z)
        return np.array([s * np.cos(p), s * np.sin(p), z])
    va, vb = vec(za, pa), vec(zb, pb)
    return float(np.arctan2(np.linalg.norm(np.cross(va, vb)), np.dot(va, vb)))


def angular_step_deg(order):
    """RELION's nominal angular sampling of ``order``: ``360 / (6 * 2**order)`` degrees
    (order 2: 15, order 3: 7.5, order 4: 3.75)."""
    return 360.0 / (6 * nside(order))
