"""The built-in drafters, one module per method family, installed as
``pytest_specdec.drafters`` (pyproject.toml's package-dir maps this folder there).

Each is registered in pyproject.toml under the entry-point group
``pytest_specdec.drafters``, exactly as a third-party package registers its own.
"""
