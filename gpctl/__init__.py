"""gpctl's control room: the Typer CLI (and, later, the Textual TUI) over the engine's run directory."""
__version__ = "0.1.0"
