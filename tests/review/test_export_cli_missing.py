"""`qcsight review export` and `audit` read the store: a path that is not there is an error, not an empty export."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette")

from qcsight_core import cli as dispatcher


@pytest.mark.parametrize("action", ["export", "audit"])
def test_export_and_audit_refuse_a_store_that_is_not_there(action: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "typo" / "cloud.db"
    out = tmp_path / "out.jsonl"
    assert dispatcher.main(["review", action, "--store", f"sqlite:{missing}", "--output", str(out)]) == 1
    assert f"{missing} does not exist" in capsys.readouterr().err
    assert not missing.parent.exists() and not out.exists()
