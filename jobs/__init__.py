"""Jobs: one thin entrypoint per pipeline stage, runnable with ``python -m jobs.<name>`` or ``ray job submit``."""
