"""Placeholder: the flow helper writes this module (issue 3)."""
