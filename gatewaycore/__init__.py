"""What the appliance and the control plane share: the link protocol between them, the
bandwidth schedule model, the region table, the rules for every value a user or a peer
types (`rules`), the time format, and the safety helpers for files, logs, JSON bodies and
connections. Both sides import it; neither imports the other.
"""
