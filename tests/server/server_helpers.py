"""Assertions shared by the server tests (a module of its own: conftest modules cannot be imported)."""

from __future__ import annotations

import json
from typing import Any

ERROR_FIELDS = {"message", "type", "param", "code"}


def assert_error_shape(body: Any, status: int | None = None, code: str | None = None) -> dict[str, Any]:
    """``body`` (bytes, str or parsed JSON) is OpenAI's error envelope, without any traceback text."""
    text = body.decode() if isinstance(body, bytes) else body if isinstance(body, str) else json.dumps(body)
    assert "Traceback" not in text and 'File "' not in text, text
    parsed = json.loads(text) if isinstance(body, bytes | str) else body
    assert set(parsed) == {"error"}, parsed
    error = parsed["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error
