"""The old import path of :mod:`pytest_specdec.protocol.drafter`, kept for third-party
drafters: importing it gives that very module (same objects, same names)."""

import sys

from pytest_specdec.protocol import drafter as _module

sys.modules[__name__] = _module
