"""`python -m tinytale` runs the CLI (also what `torchrun -m tinytale` starts)."""

from tinytale.cli import app

app(prog_name="tinytale")
