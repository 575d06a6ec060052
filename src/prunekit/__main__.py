"""``python -m prunekit``: the command line of :mod:`prunekit.cli`."""

from prunekit.cli import main

raise SystemExit(main())
