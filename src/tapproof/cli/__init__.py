"""Command-line interface: one module per subcommand; only here: print and exit codes."""
