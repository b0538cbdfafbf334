"""``mst-shards``: prepare ImageNet (or any ImageFolder) once as verified WebDataset shards."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mst_ds")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"

TOOL_VERSION = f"mst-shards {__version__}"
