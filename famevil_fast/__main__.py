"""``python -m famevil_fast`` is the ``famevil-fast`` command."""

import sys

from famevil_fast.cli.main import main

sys.exit(main())
