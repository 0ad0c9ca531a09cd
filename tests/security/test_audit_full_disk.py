"""Issue #18 §4, on a real full disk: a record cut short by ENOSPC is torn, not tampering.

Finding: after a full disk tore the last line, `deid` and `verify` refused forever ("the last
audit record is damaged") and `status` reported a broken chain, indistinguishable from
tampering. Here the lake lives on a 1 MiB tmpfs in a private mount namespace (``unshare -m``,
root only), the disk is filled, and a record is appended: the write stops part way (ENOSPC),
the append fails with one clear line, the chain reads as torn; once space is freed, the repair
cuts the torn bytes, records itself, and the chain is intact again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import PrivateTmpfs

SCRIPT = r"""
import json, os, sys
from pathlib import Path
from pipeline.errors import LakeError
from pipeline.lake import LakePaths
from pipeline.lake.audit import AuditLog, repair_torn, verify_chain
from pipeline.lake.identity import open_lake
from pipeline.lake.keys import LakeKeys

root = Path(sys.argv[1])
keys = LakeKeys(b"full-disk-test-key-32-bytes-long")
lake = LakePaths(root / "lake")
open_lake(lake, keys, create=True)
log = AuditLog(lake, keys, witness="none")
for i in range(3):
    log.append("read", count=i)
filler = root / "filler"
fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk, then give back 8 KiB
try:
    while True:
        os.write(fd, b"\0" * 4096)
except OSError:
    pass
os.close(fd)
os.truncate(filler, max(0, filler.stat().st_size - 8192))
out = {}
try:
    log.append("big", blob="z" * 20000)
    out["append"] = "ok"
except LakeError as exc:
    out["append"] = str(exc)
check = verify_chain(lake, keys)
out["torn"], out["ok"], out["records"] = check.torn, check.ok, check.records
try:
    log.append("after")
    out["next_append"] = "ok"
except LakeError as exc:
    out["next_append"] = str(exc)
filler.unlink()
done = repair_torn(lake, keys, witness="none")
out["removed"] = done.removed_bytes
after = verify_chain(lake, keys)
out["after_ok"], out["after_records"] = after.ok, after.records
print(json.dumps(out))
"""


def test_a_full_disk_tears_the_last_record_and_repair_mends_it(
    tmp_path: Path, private_tmpfs: PrivateTmpfs
) -> None:
    unshare, mount = private_tmpfs.unshare, private_tmpfs.mount_point
    script = tmp_path / "fill.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [unshare, "-m", "sh", "-c",
         'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$1" "$2" "$0"',
         str(mount), sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["append"].startswith("cannot write the audit log (No space left on device)")
    assert out["torn"] is True
    assert out["ok"] is False
    assert out["records"] == 3
    assert "torn" in out["next_append"]
    assert "pacsflow audit repair" in out["next_append"]
    assert out["removed"] > 0
    assert out["after_ok"] is True
    assert out["after_records"] == 4  # the three, and the repair's own record
