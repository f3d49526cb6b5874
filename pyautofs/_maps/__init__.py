"""autofs maps: sun-format entries, master maps, program maps, includes, LDAP -> mount specs.

Pure parsers take text (and a ``read_include(name, including)`` callable), so they can be
fuzzed without files; ``_sources`` is the one module that reads files, ``_ldap`` the one
that talks to a directory server. No kernel calls, no trio.

- ``_types``: ``MountSpec``, ``OffsetMount``, ``MapEntry``, ``MapWarning``, ``valid_key``.
- ``_sun``: words, ``$VAR`` expansion, compiled entries (``&`` and the escape check),
  ``SunMap`` and ``parse_sun_map(text, ...)``.
- ``_include``: what ``+name`` means, loops and depth.
- ``_master``: ``MasterEntry`` and ``parse_master(text, ...)``.
- ``_program``: ``ProgramMap`` (``command`` and ``parse_output``).
- ``_sources``: map files (non-blocking, regular files only, size cap), ``load_map``,
  ``parse_master_map(path)``, ``reload_map``.
- ``_ldap``: LDAP map names, schemas, RFC 4515 filters and the client connection.
"""
