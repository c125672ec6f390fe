"""`python -m hil.cli ...` runs the `hil` command line."""

from hil.cli import main

main()
