"""``python -m loadertune``: the same command line as ``loadertune``."""

from loadertune.cli import main

raise SystemExit(main())
