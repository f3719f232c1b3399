"""``python -m adacs_lightning.sweeps``: a sweep file's path, or the commands an agent would run."""

from . import main

main()
