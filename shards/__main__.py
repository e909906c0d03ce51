"""``python -m shards {write,verify,bench}``: see ``shards.cli``."""
from .cli import main

raise SystemExit(main())
