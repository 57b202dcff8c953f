"""The one error a person reads: what went wrong with a model, a folder or an argument, in one sentence."""


class ModelError(RuntimeError):
    """A model could not be found, built or loaded; the message is one sentence meant for a person."""
