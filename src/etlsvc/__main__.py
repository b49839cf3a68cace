"""`python -m etlsvc` is the same as the `etlsvc` command."""

from etlsvc.cli import main

raise SystemExit(main())
