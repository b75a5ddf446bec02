"""A streamed answer whose body is closed however the answer ends."""

from __future__ import annotations

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Send


class ClosingStreamingResponse(StreamingResponse):
    """Starlette's :class:`StreamingResponse`, its body iterator closed as
    soon as the answer ends, completed or not.

    When the client goes away, Starlette cancels the task sending the body;
    cancelled while it waited to send a chunk, it left the body iterator
    suspended, and only the garbage collector closed it, possibly minutes
    later (a reference cycle through the cancellation's traceback): until
    then the answer kept what its generators hold, an open object and a
    decoded frame's share of the pixel budget (:mod:`pacs.pixel_memory`)."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                # Shielded: the send task may be being cancelled right now.
                with anyio.CancelScope(shield=True):
                    await aclose()
