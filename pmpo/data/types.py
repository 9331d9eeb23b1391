"""The plain data types every data module shares: a labelled image and a dataset's splits.

A leaf module (it imports nothing of pmpo) so that the dataset loaders and the ShapeWorld
generator -- which builds a :class:`DatasetSplits` itself -- can both use the types without
importing each other. :mod:`pmpo.data.datasets` and :mod:`pmpo.data` re-export them, where
users import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The template used for custom data, and the generic CLIP one used for all ImageNet sets.
DEFAULT_TEMPLATE = "a photo of a {}."


def clean_classname(name: str) -> str:
    """A class name as the text encoder sees it, wherever it comes from (a dataset's folders, a
    user's list, the app's labels): CoOp's trainers feed ``name.replace("_", " ")`` to the text
    encoder for every dataset (Food101 ``apple_pie``, UCF101 ``Apply_Eye_Makeup``); runs of spaces
    become one."""
    return " ".join(str(name).replace("_", " ").split())


@dataclass(frozen=True)
class Datum:
    """One labelled image: an absolute path, its class id and the (cleaned) class name."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset ready for few-shot sampling: three lists of :class:`Datum` plus class names.

    ``classnames[i]`` is the name of label ``i``; ``templates`` holds the dataset's hand-crafted
    prompt template(s) (CoOp's ``CUSTOM_TEMPLATES``), used by zero-shot CLIP and for text
    initialisation. Test-only datasets (the ImageNet variants) have empty train and val lists.
    """

    name: str
    classnames: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
