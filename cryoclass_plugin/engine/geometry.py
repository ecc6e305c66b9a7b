"""Rotations in RELION's convention.

Euler angles are ZYZ (rot, tilt, psi) in degrees.  The matrix ``A`` maps a reference
(map) coordinate to an image coordinate: a 2D image pixel at (x, y) is the line integral
over z of ``V(A^T (x, y, z))``, and the 2D Fourier component at (kx, ky) samples the 3D
transform at ``A^T (kx, ky, 0)``.  Vectors are ordered (x, y, z).
"""
import numpy as np


def euler_to_matrix(rot, tilt, psi):
    """RELION's rotation matrices for angles in degrees; broadcasts, returns (..., 3, 3)."""
    rot, tilt, psi = np.broadcast_arrays(*(np.deg2rad(np.asarray(a, dtype=np.float64))
                                           for a in (rot, tilt, psi)))
    ca, sa = np.cos(rot), np.sin(rot)
    cb, sb = np.cos(tilt), np.sin(tilt)
    cg, sg = np.cos(psi), np.sin(psi)
    A = np.empty(rot.shape + (3, 3))
    A[..., 0, 0] = cg * cb * ca - sg * sa
    A[..., 0, 1] = cg * cb * sa + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cb * ca - cg * sa
    A[..., 1, 1] = -sg * cb * sa + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sb * ca
    A[..., 2, 1] = sb * sa
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(A):
    """Inverse of :func:`euler_to_matrix`: (..., 3, 3) -> (rot, tilt, psi) in degrees.

    Tilt is in [0, 180]; at tilt 0 or 180 the split between rot and psi is arbitrary and
    rot is set to 0 (as RELION's Euler_matrix2angles does).
    """
    A = np.asarray(A, dtype=np.float64)
    cb = np.clip(A[..., 2, 2], -1.0, 1.0)
    tilt = np.arccos(cb)
    sb = np.sin(tilt)
    regular = sb > 1e-6
    rot = np.where(regular, np.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
    psi = np.where(regular, np.arctan2(A[..., 1, 2], -A[..., 0, 2]),
                   np.arctan2(-A[..., 1, 0], A[..., 1, 1]) * np.where(cb > 0, 1.0, -1.0))
    # At tilt == 180 deg the matrix is [[-c, s, 0], [s, c, 0], [0, 0, -1]] with angle psi-rot.
    psi = np.where(~regular & (cb < 0), np.arctan2(A[..., 1, 0], A[..., 1, 1]), psi)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def angular_distance_deg(A, B):
    """Angle (degrees) of the rotation ``A B^T`` for stacks of matrices (..., 3, 3)."""
    # trace(A B^T) = sum_ij A_ij B_ij: 9 products instead of a 27-product matrix product.
    cos = ((A * B).sum(axis=(-2, -1)) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))
