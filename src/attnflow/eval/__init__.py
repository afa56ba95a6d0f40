"""Document-QA attribution evaluation (issue 7)."""
