"""Sphinx configuration for the pyautofs documentation (built with -W: no warnings)."""

from __future__ import annotations

project = "pyautofs"
author = "the pyautofs developers"
copyright = "2026, the pyautofs developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "furo"
