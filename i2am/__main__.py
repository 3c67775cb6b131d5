"""`python -m i2am` is the `i2am` command (also under `accelerate launch -m i2am eval ...`)."""
import sys

from .cli import main

sys.exit(main())
