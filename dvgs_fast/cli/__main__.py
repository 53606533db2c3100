"""``python -m dvgs_fast.cli ...`` = ``dvgs-fast ...``."""
import sys

from ._main import main

sys.exit(main())
