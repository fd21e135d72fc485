"""The one error of starting up, shared by every part the daemon starts.

Its own module so that the parts that can fail at start (the listeners, the local API) raise
it without importing the daemon that composes them: the import graph stays one-way.
"""

from __future__ import annotations


class StartupError(Exception):
    """The daemon cannot start; one line for the operator, exit status 1."""
