"""Hooks pytest-specdec adds to pytest (the plugin registers them through
``pytest_addhooks``). Implement them in a ``conftest.py`` or in a plugin module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import pytest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pytest_specdec.drafter import Drafter


@pytest.hookspec
def pytest_specdec_register_drafters(
    config: pytest.Config,
) -> Mapping[str, Callable[..., Drafter]] | None:
    """Drafters defined outside any installed package, e.g. in a ``conftest.py``.

    Return a mapping *name -> factory* (or None). A factory is what an entry point of
    the group ``pytest_specdec.drafters`` names, usually the drafter class: called with
    the drafter's options as keyword arguments, it returns a fresh drafter (the
    protocol is in :mod:`pytest_specdec.drafter`). Its keyword parameters, each with a
    default and an ``int``/``float``/``bool``/``str`` annotation, are its command-line
    options (``--specdec-drafter NAME:key=value``), and a class attribute
    ``ablations`` adds variants to the default run, exactly as for installed drafters.

    These drafters join the installed ones: a suite run includes them unless
    ``--specdec-drafter`` picks others, and their origin reads
    ``conftest (path/to/conftest.py)`` (``plugin (module)`` for a ``-p`` module). A
    name that is already registered replaces the earlier drafter, with a warning. An
    implementation that raises, or returns anything but a mapping of valid names to
    drafter factories, gets a warning naming it, and the other drafters run.

    The hook is called once, while pytest configures the session: define it in a
    ``conftest.py`` that pytest loads at start-up (the rootdir's, or the one in a
    folder given on the command line, e.g. ``suites/conftest.py`` for
    ``pytest suites/``), or in a plugin module loaded with ``-p``.

    Example, a complete ``conftest.py``::

        from pytest_specdec.drafter import Draft, DrafterBase


        class RepeatLast(DrafterBase):
            # drafts the last token again, up to `length` times

            def __init__(self, length: int = 2):
                self.length = length

            def propose(self, context, k):
                return Draft(tuple(context[-1:]) * min(k, self.length))


        def pytest_specdec_register_drafters(config):
            return {"repeat_last": RepeatLast}

    then ``pytest suites/ --specdec-drafter repeat_last:length=3``.
    """
