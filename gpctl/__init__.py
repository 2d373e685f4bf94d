"""gpctl's control room: the Typer CLI and the Textual TUI over the engine's run directories and queue."""
__version__ = "0.1.0"
