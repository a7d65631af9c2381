"""Hooks pytest-specdec adds to pytest (the plugin registers them through
``pytest_addhooks``). Implement them in a ``conftest.py`` or in a plugin module."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pytest

from pytest_specdec.protocol.drafter import Drafter
from pytest_specdec.reporting.sections import Section


@pytest.hookspec
def pytest_specdec_register_drafters(
    config: pytest.Config,
) -> Mapping[str, Callable[..., Drafter]] | None:
    """Drafters defined outside any installed package, e.g. in a ``conftest.py``.

    Return a mapping *name -> factory* (or None). A factory is what an entry point of
    the group ``pytest_specdec.drafters`` names, usually the drafter class: called with
    the drafter's options as keyword arguments, it returns a fresh drafter (the
    protocol is in :mod:`pytest_specdec.protocol.drafter`). Its keyword parameters, each with a
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

        from pytest_specdec.protocol.drafter import Draft, DrafterBase


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


@pytest.hookspec
def pytest_specdec_report_sections(config: pytest.Config, records: Sequence[dict],
                                   sections: list[Section]) -> None:
    """The sections of the session's report, which its Markdown and HTML files both show.

    ``sections`` is a list to change in place (as pytest-benchmark's
    ``pytest_benchmark_update_machine_info`` changes ``machine_info``): append, insert,
    remove or reorder :class:`~pytest_specdec.reporting.sections.Section` objects.
    pytest-specdec's own implementation runs first (``tryfirst``) and fills it with the
    default sections (:func:`~pytest_specdec.reporting.sections.default_sections`), so an
    implementation in a ``conftest.py`` or a plugin sees them. ``records`` are the
    session's case records (plain dicts, see :class:`pytest_specdec.bench.record.CaseRecord`;
    with the fields a drafter adds through ``record_fields()``).

    A section is an id (its HTML anchor), a title, a note, and blocks: ``Table(headers,
    rows)``, ``Items(["- a line", ...])``, ``Text("a paragraph")``, ``Heading("a
    sub-heading")``; ``**bold**`` and ```code``` are kept in Markdown and become tags in
    HTML. It is called each time the report is written (as cases finish, and at the end).

    Example, a ``conftest.py`` adding a table of each drafter's tokens per step before
    the closing "How to read"::

        from pytest_specdec.reporting.sections import Section, Table


        def pytest_specdec_report_sections(config, records, sections):
            rows = [[r["drafter"], r["paradigm"], f"{r['new_tokens'] / r['steps']:.2f}"]
                    for r in records if r["steps"]]
            at = next((i for i, s in enumerate(sections) if s.id == "how-to-read"),
                      len(sections))
            sections.insert(at, Section("tokens-per-step", "Tokens per step",
                                        "New tokens over target forwards.",
                                        [Table(["drafter", "paradigm", "tokens/step"], rows)]))
    """
