"""The Gradio side of the app: one module per tab in ``tabs/``, the model loading policy, the
server's launch options and hardening, and the static text and style."""
