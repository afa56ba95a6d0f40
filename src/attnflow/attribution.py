"""Placeholder: the flow helper writes this module (issue 3)."""


def attribute(*args, **kwargs):
    raise NotImplementedError("attnflow.attribute is being written (issue 3)")
