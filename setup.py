"""Packaging, so the same code runs locally, in CI and on Dataflow workers (--setup_file ./setup.py)."""

import pathlib

from setuptools import setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="streamguard",
    version="0.1.0",
    description="Streaming fraud and abuse mitigation for an audio streaming service, on Apache Beam.",
    python_requires=">=3.11,<3.12",
    # Listed explicitly: only these ship to workers.
    packages=["pipelines", "schemas", "transforms"],
    package_data={"schemas": ["*.avsc"]},
    install_requires=REQUIREMENTS,
)
