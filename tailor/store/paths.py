"""One rule for user ids that become file names, shared by the user store and by run folders.

An id is safe as a file name when it is 1-128 letters, digits, `_`, `.` or `-` and does not start with `.` or `-`
(no `..`, no hidden files, nothing a shell reads as an option). The store refuses any other id at its boundary; a
run folder, whose ids come from data files, names such a user's state by a hash of the id instead.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

USER_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""Letters, digits, `_`, `.`, `-`; 1 to 128 characters; not starting with a dot or a dash."""


def is_safe_user_id(user_id: object) -> bool:
    return isinstance(user_id, str) and USER_ID.fullmatch(user_id) is not None


def state_path(folder: Path, user_id: str) -> Path:
    """The file holding a user's state in `folder`: the id itself when it is safe, else a hash of it, so no id can
    name a file outside the folder."""
    name = user_id if is_safe_user_id(user_id) else "u-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]
    return folder / f"{name}.safetensors"
