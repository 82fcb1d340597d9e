"""`python -m ptmig ...` is `ptmig ...`."""

from ptmig.cli import main

main(prog_name="ptmig")
