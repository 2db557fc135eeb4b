"""The golden fixtures are byte-identical to what the reference produced (sha256 manifest)."""
import hashlib
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


def test_manifest_covers_every_data_file():
    on_disk = {
        p.relative_to(GOLDEN).as_posix()
        for p in GOLDEN.rglob("*")
        if p.is_file() and p.name not in {"manifest.json", "README.md"}
    }
    assert on_disk == set(MANIFEST), f"unlisted: {on_disk - set(MANIFEST)}, missing: {set(MANIFEST) - on_disk}"
    assert len(MANIFEST) == 15


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture_file_matches_manifest(name):
    data = (GOLDEN / name).read_bytes()
    assert len(data) == MANIFEST[name]["bytes"]
    assert hashlib.sha256(data).hexdigest() == MANIFEST[name]["sha256"]
