"""Repo root: only what the suites need locally (the plugin itself is installed through
its pytest11 entry point)."""
