"""The pytest front end: hooks and fixtures (:mod:`.hooks`, the ``pytest11`` entry
point), hookspecs, the options (one definition, read by pytest and the CLI) and xdist."""
