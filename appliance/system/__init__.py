"""Adapters between the console and the operating system.

The console runs as root on the appliance and changes what the daemon (unprivileged) may not:
network configuration, NTP servers, the hostname. Each module here wraps one OS facility so the
console screens stay free of file formats and subprocess calls, and so tests can point every
adapter at a temporary directory instead of the host's /etc.
"""
