"""``python -m llavakit`` is the ``llavakit`` command."""

import sys

from llavakit.cli import main

sys.exit(main())
