"""`python -m lora_fx bake ...`: see lora_fx/cli.py."""

import sys

from .cli import main

sys.exit(main())
