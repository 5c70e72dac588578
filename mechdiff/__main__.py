"""``python -m mechdiff``: the ``mechdiff`` console script."""

from mechdiff.cli import main

main()
