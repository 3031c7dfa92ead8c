"""monosemantic: sparse coders, decompiled networks, circuits and deep description.

The package follows the Sparsify agenda bottom to top; lower layers never import higher ones:
utils, metrics -> models -> data -> coders -> train, toy -> evaluate -> cli.
"""

__version__ = "0.1.0"
