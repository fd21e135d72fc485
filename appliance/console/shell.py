"""Menu 6, Command prompt: the restricted diagnostics prompt.

What a line may contain, and how a child program is started (stdin /dev/null, as nobody with
only the capabilities it needs), is decided in appliance/system/restricted.py; this module only
reads lines, shows refusals and help, and dispatches.
"""

from __future__ import annotations

import logging

from appliance.console.auth import PasswordFileError, check_new_password
from appliance.console.context import Context
from appliance.console.ui import Back
from appliance.system import restricted

log = logging.getLogger(__name__)


def change_password(ctx: Context, forced: bool = False) -> bool:
    """Ask for a new password twice and save it; True when saved."""
    term = ctx.term
    if forced:
        term.say("You are using the default password: choose a new one now.")
    term.say("6 to 512 printable ASCII characters, not 'password'.")
    while True:
        new = term.ask("New password: ", password=True)
        problem = check_new_password(new)
        if problem:
            term.error(problem)
            continue
        again = term.ask("Retype new password: ", password=True)
        if again != new:
            term.error("the passwords do not match; try again.")
            continue
        try:
            ctx.passwords.set(new)
        except PasswordFileError as exc:
            term.error(f"{exc}. The password was not changed.")
            return False
        term.say("Password changed.")
        return True


def _passwd(ctx: Context) -> None:
    current = ctx.term.ask("Current password: ", password=True)
    if not ctx.passwords.verify("admin", current):
        ctx.term.error("wrong password; not changed.")
        return
    change_password(ctx)


def _logged_name(line: str) -> str:
    """The command word of a refused line when it is a known command; never free text, which
    could be a password typed at the wrong prompt."""
    words = line.split(maxsplit=1)
    return words[0] if words and words[0] in restricted.COMMANDS else "other"


def run(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    term.say("Restricted command prompt. Type h for the commands, exit to return.")
    while True:
        try:
            line = term.ask("AWS Appliance# ")
        except Back:
            return
        try:
            cmd = restricted.parse(line)
        except restricted.CommandRefused as exc:
            log.info("event=restricted_refused command=%s", _logged_name(line))
            term.say(str(exc))
            continue
        if cmd is None:
            continue
        if cmd.name == "exit":
            return
        try:
            if cmd.name == "h":
                term.say(restricted.help_text())
            elif cmd.name == "man":
                term.say(restricted.man_text(cmd.args[0]))  # parse() made sure there is one
            elif cmd.name == "ncport":
                term.say(restricted.ncport(cmd.args))
            elif cmd.name == "passwd":
                _passwd(ctx)
            else:
                problem = restricted.run_external(cmd)
                if problem:
                    term.say(problem)
        except Back:
            term.say("(interrupted)")
        except KeyboardInterrupt:
            term.say("(interrupted)")
