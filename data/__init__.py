"""Data preparation for the harness; see data/prepare_common.py."""
