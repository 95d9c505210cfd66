"""``python -m fastgraph``: the ``fastgraph`` command line."""

from fastgraph.cli.main import main

raise SystemExit(main())
