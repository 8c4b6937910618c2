"""`python -m smallbms_bus.metrics --markdown` prints docs/metrics.md."""

from smallbms_bus.metrics.docs import main

raise SystemExit(main())
