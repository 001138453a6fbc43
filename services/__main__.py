"""`python -m dqnfleet` is the `dqnfleet` command."""

import sys

from dqnfleet.cli.main import main

sys.exit(main())
