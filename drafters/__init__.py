"""The built-in drafters, one module per method family.

Each is registered in pyproject.toml under the entry-point group
``pytest_specdec.drafters``, exactly as a third-party package registers its own.
"""
