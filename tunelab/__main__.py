"""`python -m tunelab` runs the `tunelab` command."""

from tunelab.cli import main

main()
