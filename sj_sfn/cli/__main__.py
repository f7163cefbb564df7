"""``python -m sj_sfn.cli``: the ``sj-sfn`` command."""

import sys

from .main import main

sys.exit(main())
