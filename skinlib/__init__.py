"""skinlib: the logic behind the skin-attribute grounding companion book."""
__version__ = "0.1.0"

import os as _os

# Before anything imports torch: with OpenMP's default (active) waiting, torch's idle threads spin
# and a second busy process on the same 2 cores slows a training step 10x or more. Passive waiting
# costs nothing measurable when the cores are free. A value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
