"""Packaging, so the same code runs locally, in CI and on Dataflow workers (--setup_file ./setup.py).

The fold (``transforms/fold.py``, the job's most-run code) is compiled by
Cython where it can be, as Beam compiles its own per-element code: ``make``
builds it in place (``setup.py build_ext --inplace``), and a Dataflow worker
builds it when it installs the package (pyproject.toml names Cython as a
build requirement). The extension is optional: where no C compiler or no
Cython is at hand, the install still succeeds and the same file runs as plain
Python (``transforms.fold.COMPILED`` says which). Only the one module is
compiled: Beam's own code inspects our ``DoFn``s and functions, and
compiled functions do not look like Python functions to it.
"""

import pathlib

from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]


def compiled_modules() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:  # plain Python: the same results, a slower fold
        return []
    fold = Extension("transforms.fold", ["transforms/fold.py"], optional=True)
    # The .pxd beside the file declares the C types; annotations stay Python hints, as where it is not compiled.
    return cythonize([fold], language_level=3, quiet=True, compiler_directives={"annotation_typing": False})


setup(
    name="streamguard",
    version="0.1.0",
    description="Streaming fraud and abuse mitigation for an audio streaming service, on Apache Beam.",
    python_requires=">=3.11,<3.12",
    # Listed explicitly: only these ship to workers.
    packages=["pipelines", "schemas", "transforms"],
    package_data={"schemas": ["*.avsc"], "transforms": ["*.pxd"]},
    install_requires=REQUIREMENTS,
    ext_modules=compiled_modules(),
)
