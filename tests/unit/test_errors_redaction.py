"""Redis URLs as shown in logs and errors: no password in any form survives."""

from __future__ import annotations

import pytest

from keel_pdp.settings import redacted_url

SECRET = "s3cr3t-Value"


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://127.0.0.1:6379/0?password={SECRET}", "redis://127.0.0.1:6379/0?password=***"),
    (f"redis://keel:{SECRET}@10.0.0.5:6379/2", "redis://keel:***@10.0.0.5:6379/2"),
    (f"redis://:{SECRET}@h/0", "redis://:***@h/0"),
    (f"redis://{SECRET}@h/0", "redis://***@h/0"),  # a password written without its colon
    (f"rediss://u:{SECRET}@h:6380/0?ssl_cert_reqs=none&Password={SECRET}",
     "rediss://u:***@h:6380/0?ssl_cert_reqs=none&Password=***"),
    (f"unix:///run/redis.sock?db=1&password={SECRET}&username=keel",
     "unix:///run/redis.sock?db=1&password=***&username=keel"),
    (f"redis://h/0?ssl_keyfile_password={SECRET}&token={SECRET}",
     "redis://h/0?ssl_keyfile_password=***&token=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    (f"redis://[::1/0?password={SECRET}", "redis://***"),  # unparseable: nothing shown
    (f"redis://h/0?password={SECRET}&password={SECRET}x",
     "redis://h/0?password=***&password=***"),
])
def test_passwords_never_survive_redaction(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    assert SECRET not in redacted_url(url)
