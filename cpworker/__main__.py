"""`python -m cpworker` runs the command line."""

from cpworker.cli import main

raise SystemExit(main())
