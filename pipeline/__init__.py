"""pacsflow: an AI research and analytics pipeline over hospital PACS archives.

The package is layered (see ``STYLE.md``): the CLI calls stages, stages meet only through lake
tables, and heavy libraries (torch, monai, pynetdicom, dicomweb-client) are imported only where
they are used, so ``import pipeline`` stays light.
"""

import logging

from pipeline._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
