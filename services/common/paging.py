"""Page tokens: opaque to callers, a position in a listing to the service."""

from __future__ import annotations

import base64
import binascii

from tunewire.services.common.errors import InvalidArgument

# Past any listing, and within every database's 64-bit OFFSET.
MAX_POSITION = 2**62


def page_token(position: int) -> str:
    return base64.urlsafe_b64encode(str(position).encode()).decode()


def page_position(token: str, default: int) -> int:
    """The position a token of page_token names (`default` for ''), or
    InvalidArgument on page_token for anything this service did not return."""
    if not token:
        return default
    try:
        position = int(base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii"))
    except (ValueError, binascii.Error, UnicodeError):
        position = -1
    if not 0 <= position < MAX_POSITION:
        raise InvalidArgument.field(
            "page_token", "not a token this service returned: pass the previous page's next_page_token, or '' for the first page"
        )
    return position
