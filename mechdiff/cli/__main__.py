"""``python -m mechdiff.cli``: the ``mechdiff`` console script."""

from mechdiff.cli import main

main()
