"""wmbench: benchmark white-box neural-network watermarking methods against removal attacks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wmbench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
