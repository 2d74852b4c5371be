"""``python -m posttrain.report DIR``: see :mod:`posttrain.report`."""

from posttrain.report.cli import main

raise SystemExit(main())
