"""Training: the Trainer subclass and the end-to-end workflow."""
