"""`python -m controlplane ...`: see controlplane.cli."""

from controlplane.cli import main

raise SystemExit(main())
