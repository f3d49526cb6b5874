"""The raw bindings: ioctls, uapi structs, mount syscalls, mountinfo, pipes, packets.

For people who build their own engine. This module only re-exports.
"""

from __future__ import annotations
