"""Sub-commands of the ``fdm`` command line (see :mod:`fdm.cli`)."""
