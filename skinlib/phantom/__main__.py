"""`python -m skinlib.phantom`: write a phantom release, or refit its summaries of the real rows."""
import sys

from skinlib.phantom import main

sys.exit(main())
