"""Command line: thin commands over the public API."""
