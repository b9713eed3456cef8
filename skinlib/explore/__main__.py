"""`python -m skinlib.explore`: the live retrieval explorer in JupyterLab."""
import sys

from skinlib.explore import main

sys.exit(main())
