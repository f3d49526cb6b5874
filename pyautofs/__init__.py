"""pyautofs: the Linux autofs protocol and file-descriptor passing.

This module is the everyday API; it only re-exports. The raw kernel bindings are in
:mod:`pyautofs.lowlevel`.
"""

from __future__ import annotations

__version__ = "0.1.0"
