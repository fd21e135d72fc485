"""The software version, kept in one place so the daemon, the console and the build agree."""

__version__ = "0.1.0"
