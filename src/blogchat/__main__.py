"""`python -m blogchat` runs the `blogchat` command."""

import sys

from blogchat.cli import main

sys.exit(main())
