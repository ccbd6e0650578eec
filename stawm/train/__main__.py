"""`python -m stawm.train` is `stawm-train`."""

import sys

from .cli import main

sys.exit(main())
