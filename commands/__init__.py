"""The ``cusa`` commands, one module per command or command group; ``cli.py`` registers them.

- ``store``, ``teachers``, ``cache``, ``datasets``: the groups ``cusa store ...``, ``cusa
  teachers ...``, ``cusa cache ...``, ``cusa datasets list`` (each module's ``app``), and
  ``datasets.shard_cmd``;
- ``extract``, ``train``, ``evaluate``, ``report``: one top-level command each (``*_cmd``);
- ``options``: the options more than one command declares (typer ``Annotated`` aliases);
- ``exit_codes``: how any error becomes one ``error: ...`` line and an exit code.

A command module imports only typer and these shared modules at the top; the library is
imported inside the command, so ``cusa --help`` stays fast.
"""
