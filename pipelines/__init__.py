"""Entry points: the pipeline graph (``pipeline``) and the commands that run it."""
