from fastgraph.cli import main

raise SystemExit(main())
