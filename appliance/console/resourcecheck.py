"""Menu 4, View system resource check."""

from __future__ import annotations

from appliance.console.context import Context
from appliance.system import resources


def run(ctx: Context) -> None:
    ctx.term.clear()
    ctx.term.say("System resource check")
    ctx.term.say("")
    results = resources.check()
    for result in results:
        ctx.term.say(result.line())
    ctx.term.say("")
    count = resources.error_count(results)
    ctx.term.say(f"{count} error(s). The gateway needs at least the minimums to run backup "
                 "jobs reliably." if count else "All resources meet the minimums.")
    ctx.term.pause()
