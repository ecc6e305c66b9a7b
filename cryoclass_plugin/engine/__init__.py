"""The bundled cryoclass engine: Bayesian EM 3D classification (RELION Class3D).

Importable without pyworkflow.  Conventions used everywhere in the engine:

Arrays
    Volumes are ``(z, y, x)``, images ``(y, x)``, float32, with an even box ``N``.  The
    centre (origin) of a box is the voxel at index ``N // 2`` on every axis.  A voxel at
    index ``(iz, iy, ix)`` has coordinates ``(x, y, z) = (ix, iy, iz) - N // 2`` in pixels.
Fourier transforms
    Centred and unnormalised: ``F = fftshift(fftn(ifftshift(v)))`` so that frequency
    ``k`` (cycles per box, integer) sits at index ``k + N // 2``.  With this choice the
    2D transform of a real-space sum projection equals the central slice of the 3D
    transform exactly, and greyscales stay comparable between maps and images.  A
    frequency index ``k`` is ``k / (N * apix)`` in 1/Angstrom.
Rotations
    ZYZ Euler angles (rot, tilt, psi) in degrees and RELION's matrix, see
    :mod:`.geometry`.  Projection: ``image(x, y) = sum_z V(A^T (x, y, z))``; in Fourier
    space the component at (kx, ky) samples the 3D transform at ``A^T (kx, ky, 0)``.
Shifts
    Origins are stored in Angstrom (``rlnOriginXAngst``, ``rlnOriginYAngst``) with
    RELION's sign: the experimental image is the projection shifted by minus the origin,
    so shifting the image by ``+origin`` re-centres the particle.  In Fourier space
    re-centring multiplies the image transform by ``exp(-2 pi i (kx ox + ky oy) / N)``
    with the origin in pixels.
CTF
    RELION's: ``CTF = -sin(gamma)``, see :mod:`.ctf`.
"""
