"""`gpctl tui`: live loss curves and steering in the terminal."""
