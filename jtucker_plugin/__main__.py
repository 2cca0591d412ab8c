"""``python -m jtucker_plugin`` is the ``jtucker`` command."""

import sys

from jtucker_plugin.cli import main

sys.exit(main())
