"""``python -m tinylazy <command> ...``: the ``tinylazy`` console command (tinylazy.cli)."""
import sys

from .cli import main

sys.exit(main())
