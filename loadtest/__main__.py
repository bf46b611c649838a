"""``python -m loadtest SCENARIO ...``: see :mod:`loadtest.scenarios` and loadtest/README.md."""

from loadtest.scenarios import main

raise SystemExit(main())
