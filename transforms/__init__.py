"""Composite transforms of the mitigation pipeline, one module per stage."""
