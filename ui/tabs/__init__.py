"""One module per tab: its layout, and handlers of a few lines that turn the UI's values into
arguments for the pure functions in ``viz`` and return a dict keyed by component."""
