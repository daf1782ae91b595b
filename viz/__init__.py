"""Pure functions that turn tensors into what a person can look at: pictures, figures, table
rows, metrics and files. No Gradio here; the app in ``ui/`` calls these."""
