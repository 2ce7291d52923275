"""The package version, one place (read by runs, exports and the CLI)."""

__version__ = "0.2.0"
