"""Packaging, so the same code runs locally, in CI and on Dataflow workers (--setup_file ./setup.py).

The fold (``transforms/fold.py``, the job's most-run code) and the checks
parsing makes on each signal's values (``transforms/accept.py``) are compiled
by Cython where they can be, as Beam compiles its own per-element code:
``make`` builds them in place (``setup.py build_ext --inplace``), and a
Dataflow worker builds them when it installs the package (pyproject.toml
names Cython as a build requirement). The extensions are optional: where no C
compiler or no Cython is at hand, the install still succeeds and the same
files run as plain Python (each module's ``COMPILED`` says which). Only these
modules are compiled: Beam's own code inspects our ``DoFn``s and functions,
and compiled functions do not look like Python functions to it.
"""

import pathlib

from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]


# The fold, and the checks parsing makes on every well-formed signal's values (transforms/accept.py).
COMPILED = ("fold", "accept")


def compiled_modules() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:  # plain Python: the same results, more slowly
        return []
    modules = [Extension(f"transforms.{name}", [f"transforms/{name}.py"], optional=True) for name in COMPILED]
    # The .pxd beside each file declares the C types; annotations stay Python hints, as where it is not compiled.
    return cythonize(modules, language_level=3, quiet=True, compiler_directives={"annotation_typing": False})


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
