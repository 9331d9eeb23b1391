"""One module per ``pmpo`` subcommand (see ``pmpo/cli.py``)."""
