"""The backup gateway appliance: the code that runs inside the VM."""

from appliance.version import __version__

__all__ = ["__version__"]
