"""`python -m hint_platform.cli`: the `hint` command without its console script."""

import sys

from hint_platform.cli import main

sys.exit(main())
