"""Terminal primitives for the console screens: clear, say, ask, choose, confirm.

Every input goes through one prompt_toolkit prompt at a time. Ctrl-C and Ctrl-D at any prompt
raise `Back`, which each screen lets propagate to the menu above it; nothing ever falls through
to a shell. Invalid input is answered with a message naming what is accepted, then the same
question is asked again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import DummyHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.styles import Style

T = TypeVar("T")

_STYLE = Style.from_dict({"selected": "reverse", "title": "bold", "error": "bold"})


def fit(line: str, width: int = 79) -> str:
    """Cut a line to the width of an 80-column serial terminal (no wrap, no scroll)."""
    return line if len(line) <= width else line[: width - 3] + "..."


class Back(Exception):
    """The user pressed Ctrl-C or Ctrl-D: leave the current screen."""


class Terminal:
    """Reads and writes the console's terminal."""

    def __init__(self) -> None:
        self._session: PromptSession[str] = PromptSession(history=DummyHistory(), style=_STYLE)

    # -- output -------------------------------------------------------------------------------

    def clear(self) -> None:
        """Full redraw: home the cursor and erase the screen, so stray kernel messages vanish."""
        sys.stdout.write("\x1b[H\x1b[2J")
        sys.stdout.flush()

    def say(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def error(self, text: str) -> None:
        self.say(f"Error: {text}")

    # -- input --------------------------------------------------------------------------------

    def _prompt(self, message: object, **kwargs: object) -> str:
        try:
            return self._session.prompt(message, **kwargs)  # type: ignore[arg-type]
        except (KeyboardInterrupt, EOFError):
            sys.stdout.write("\r\n")
            raise Back() from None

    def ask(self, message: str, password: bool = False) -> str:
        return self._prompt(message, is_password=password)

    def ask_valid(self, message: str, parse: Callable[[str], T], allow_empty: bool = False,
                  empty: T | None = None) -> T | None:
        """Ask until `parse` accepts the answer; its ValueError message is shown each time."""
        while True:
            text = self.ask(message).strip()
            if not text and allow_empty:
                return empty
            if not text:
                self.error("an answer is needed (Ctrl-C goes back).")
                continue
            try:
                return parse(text)
            except ValueError as exc:
                self.error(str(exc))

    def confirm(self, message: str) -> bool:
        while True:
            answer = self.ask(f"{message} [y/n]: ").strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            self.error(f"answer y or n, not '{answer}'.")

    def pause(self) -> None:
        self.ask("Press Return to continue")

    def choose(self, options: list[tuple[str, str]], prompt: str = "Enter command: ",
               title: str | None = None,
               header: list[str] | Callable[[], list[str]] | None = None,
               footer: list[str] | None = None, hidden: tuple[str, ...] = ()) -> str:
        """A numbered menu answered by typing its key or by the arrow keys and Return.

        The menu lines are part of the prompt's message, so the highlight follows the arrows
        and the whole menu is redrawn with the prompt (Ctrl-L also redraws it). `hidden` keys
        are accepted without being listed (the `x` of the main menu, named in its footer).
        """
        keys = [key for key, _ in options]
        accepted = keys + list(hidden)
        state = {"index": -1}
        lines: list[str] = []
        bindings = KeyBindings()

        def refresh_header() -> None:
            lines[:] = header() if callable(header) else (header or [])

        @bindings.add("c-l")
        def _redraw(event: KeyPressEvent) -> None:
            # Kernel messages may have scribbled over the screen: fresh header, full redraw.
            refresh_header()
            event.app.renderer.clear()

        def move(event: KeyPressEvent, step: int) -> None:
            current = state["index"]
            if current < 0:
                typed = event.current_buffer.text.strip()
                current = keys.index(typed) if typed in keys else (-1 if step > 0 else 0)
            state["index"] = (current + step) % len(keys)
            event.current_buffer.text = keys[state["index"]]
            event.current_buffer.cursor_position = len(event.current_buffer.text)

        @bindings.add("up")
        def _up(event: KeyPressEvent) -> None:
            move(event, -1)

        @bindings.add("down")
        def _down(event: KeyPressEvent) -> None:
            move(event, 1)

        def message() -> FormattedText:
            parts: list[tuple[str, str]] = []
            for line in lines:
                parts.append(("", fit(line) + "\n"))
            if title:
                parts.append(("class:title", title + "\n\n"))
            typed = self._session.default_buffer.text.strip()
            for key, label in options:
                style = "class:selected" if key == typed else ""
                parts.append((style, f"  {key}: {label}"))
                parts.append(("", "\n"))
            for line in footer or []:
                parts.append(("", line + "\n"))
            parts.append(("", "\n" + prompt))
            return FormattedText(parts)

        while True:
            state["index"] = -1
            refresh_header()
            answer = self._prompt(message, key_bindings=bindings).strip()
            if answer.lower() in accepted:
                return answer.lower()
            self.clear()
            choices = ", ".join(accepted)
            self.error(f"'{answer}' is not a choice: enter one of {choices}.")
