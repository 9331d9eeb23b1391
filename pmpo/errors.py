"""Exceptions whose message is meant for the user.

Every error the command line, the app or a script should show as one clear line derives from
:class:`PMPOError`; anything else reaching the top level is a bug and keeps its traceback.
"""


class PMPOError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class BackboneLoadError(PMPOError):
    """The CLIP backbone could not be built or its weights could not be loaded."""


class CheckpointError(PMPOError):
    """A prompt checkpoint is unreadable, unsafe or does not fit the backbone."""


class DatasetError(PMPOError):
    """Dataset files are missing or malformed, or a split request is impossible."""


class InputError(PMPOError):
    """User input (images, class lists, templates, options) cannot be used as given."""
