"""prefalign: align a fine-tuned causal language model with human preferences by DPO and its variants."""

__version__ = "0.1.0"
