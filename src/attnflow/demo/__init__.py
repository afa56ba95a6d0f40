"""The embedded model organism (issue 6)."""
