"""``python -m kefu``: the same command line as the ``kefu`` script (:mod:`kefu.cli`)."""

from kefu.cli import main

raise SystemExit(main())
