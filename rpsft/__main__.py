"""``python -m rpsft``: the ``rpsft`` command line."""

from rpsft.cli import app

app(prog_name="rpsft")
