"""``python -m llavakit.train`` is ``llavakit train``."""

import sys

from llavakit.train.entry import main

sys.exit(main())
