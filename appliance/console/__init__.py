"""The appliance's local console: login, then menus over the daemon's local API.

A menu loop of prompt_toolkit prompts rather than a full-screen application: it works the same
on an 80x24 serial line (TERM=vt100) and on the VGA console, and each screen is redrawn from
scratch so kernel messages printed over it do not stay.
"""
