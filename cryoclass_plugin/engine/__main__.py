"""``python -m cryoclass_plugin.engine refine ...`` is ``cryoclass refine ...``."""
import sys

from ..cli import main

sys.exit(main())
