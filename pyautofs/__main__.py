"""``python -m pyautofs`` runs the ``pyautofs`` command."""

from pyautofs._cli.main import main

raise SystemExit(main())
