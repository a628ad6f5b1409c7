"""Command-line interface (``famevil-fast``)."""
