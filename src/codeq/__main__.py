"""``python -m codeq``: the ``codeq`` command."""
import sys

from codeq.app.cli import main

sys.exit(main())
