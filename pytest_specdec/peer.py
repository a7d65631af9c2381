"""The old import path of :mod:`pytest_specdec.bench.peer`, kept for third parties:
importing it gives that very module (same objects, same names)."""

import sys

from pytest_specdec.bench import peer as _module

sys.modules[__name__] = _module
