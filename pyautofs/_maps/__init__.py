"""autofs map formats: sun-format file maps, master maps, program maps -> mount specs.

Pure parsing plus running program maps; no kernel calls. API (``_sun.py``):
``load_map(path)`` gives a ``SunMap`` or ``ProgramMap`` with ``lookup(key, variables)``
returning a ``MapEntry`` (``mounts``: ``OffsetMount(offset, MountSpec(fstype, source,
options))``) or None; ``parse_sun_map(text)``; ``parse_master_map(path)`` gives
``MasterEntry`` lines and ``MapWarning`` (file:line) for what was skipped.
"""
