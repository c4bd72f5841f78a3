"""Preference data: reading records, chat templates, encoding and batching."""
