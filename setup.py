"""Build and install Tollgate: the Python packages and the Cython hot path.

Every ``ext/*.pyx`` is one compiled module (``ext/engine.pyx`` -> ``ext.engine``).
``pip install -e .`` builds them in place.
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent

# ext/bpfmaps.pyx loads the tc/eBPF program (ext/bpf/tollgate.bpf.o, built by
# `make build` with clang) through libbpf.
LIBRARIES = {"bpfmaps": ["bpf"]}

extensions = [
    Extension(
        f"ext.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        extra_compile_args=["-O3", "-fno-strict-aliasing", "-Wno-unused-function"],
        libraries=LIBRARIES.get(pyx.stem, []),
    )
    for pyx in sorted((HERE / "ext").glob("*.pyx"))
]

setup(
    name="tollgate",
    version="0.1.0",
    description="Traffic accounting and prepaid enforcement gateway for Linux",
    python_requires=">=3.11",
    packages=["gateway", "accounting", "accounting.store", "ext", "policy", "api"],
    package_data={"ext": ["*.pxd", "*.pyx", "*.h", "bpf/*.c", "bpf/*.o"], "accounting.store": ["migrations/*/*.sql"]},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "initializedcheck": False},
    ),
    install_requires=[
        "scapy>=2.5",
        "pyroute2>=0.7",
        "pip-nftables>=1.0",
        "prometheus-client>=0.17",
        "fastapi>=0.100",
        "uvicorn>=0.23",
        "python-multipart>=0.0.9",  # the portal's forms
        "sqlite-utils>=3.35",
        "pyrad>=2.4",  # RADIUS accounting packets (gateway/sessions)
        "psycopg[binary,pool]>=3.1",  # the PostgreSQL ledger backend and its pool (accounting/store/postgres.py)
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6.80", "httpx>=0.24", "schemathesis>=4.0"]},
    entry_points={"console_scripts": ["tollgate = gateway.cli:main"]},
)
