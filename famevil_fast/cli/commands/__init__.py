"""One module per ``famevil-fast`` subcommand (NAME, HELP, add_arguments, run)."""
