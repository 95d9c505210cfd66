"""``python -m fastgraph``: the ``fastgraph`` command line."""

from fastgraph.cli import main

raise SystemExit(main())
