"""Command groups of the ``broker`` command line (one module per group)."""
