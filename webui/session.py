"""What belongs to one browser session: its running generation's Stop, its download's Cancel, its chat.

Each browser session gets its own :class:`Session` (a ``gr.State``), so Stop in one window never stops
another's generation, which now runs beside it in the engine.
"""

from __future__ import annotations

import threading


class Session:
    # A plain class, not a dataclass: Gradio serialises a dataclass State value into the page config.
    def __init__(self) -> None:
        self.generation_cancel = threading.Event()
        self.download_cancel = threading.Event()
        self.chat_id: str | None = None  # the saved chat the Chat tab shows (webui/chats.py)

    def __deepcopy__(self, memo) -> "Session":
        # Gradio deep-copies a State's initial value into each new browser session: a fresh session.
        return Session()

    def new_generation(self) -> threading.Event:
        """The cancel event of this session's next generation (Stop sets it)."""
        self.generation_cancel = threading.Event()
        return self.generation_cancel

    def stop(self) -> None:
        self.generation_cancel.set()

    def new_download(self) -> threading.Event:
        self.download_cancel = threading.Event()
        return self.download_cancel

    def cancel_download(self) -> None:
        self.download_cancel.set()
