"""The control plane's web console, served under /console on the API's own listener
(docs/webconsole.md): sign-in (auth.py), the frame and layout (console.py), gateways
(gateways.py), the bandwidth schedule (schedule.py); HTML escaping in html.py, the CSS and
JavaScript in static/ (package data, nothing fetched at run time, no build step)."""

from controlplane.webconsole.console import PREFIX, WebConsole

__all__ = ["PREFIX", "WebConsole"]
