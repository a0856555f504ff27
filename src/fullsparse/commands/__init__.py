"""CLI subcommands, one module each (see fullsparse.cli)."""
